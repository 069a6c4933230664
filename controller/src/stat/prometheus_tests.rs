//! The PromQL `stat` sends and how it reads Prometheus' answers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use super::compute::{Filter, ParentFilter};
use super::prometheus::*;

#[test]
fn queries_carry_the_filters_as_label_matchers() {
    let all = Filter {
        direction: "outbound".into(),
        ..Filter::default()
    };
    assert_eq!(
        requests_query(&all, Duration::from_secs(60)),
        "sum by (parent, route, rule, backend, status, grpc_status) (rate(trellis_requests_total{direction=\"outbound\"}[60s]))"
    );
    let narrow = Filter {
        direction: "inbound".into(),
        route: Some("shop/cat\"alog".into()),
        parent: Some(ParentFilter::parse("catalog.shop:80").unwrap()),
    };
    assert_eq!(
        quantile_query(0.99, &narrow, Duration::from_millis(1500)),
        "histogram_quantile(0.99, sum by (parent, route, rule, backend, le) (rate(trellis_request_duration_seconds_bucket{direction=\"inbound\", route=\"shop/cat\\\"alog\", parent=~\"shop/catalog:80\"}[1500ms])))"
    );
    // Any port of the Service; the name's dots are literal.
    let any_port = Filter {
        parent: Some(ParentFilter::parse("shop/cat.alog").unwrap()),
        ..all
    };
    assert!(
        matchers(&any_port).ends_with(r#"parent=~"shop/cat\\.alog:.*""#),
        "{}",
        matchers(&any_port)
    );
}

#[test]
fn answers_are_read_with_missing_labels_as_empty_and_nan_as_unknown() {
    let text = r#"{"status":"success","data":{"resultType":"vector","result":[
        {"metric":{"parent":"shop/catalog:80","route":"shop/r","rule":"0","backend":"shop/v1:80","status":"200"},"value":[1700000000.1,"2.5"]},
        {"metric":{"route":"shop/r"},"value":[1700000000.1,"NaN"]},
        {"metric":{},"value":[1700000000.1,"+Inf"]}
    ]}}"#;
    let series = parse_answer("q", text).unwrap();
    assert_eq!(series.len(), 3);
    assert_eq!(series[0].0["backend"], "shop/v1:80");
    assert!(!series[0].0.contains_key("grpc_status"));
    assert_eq!(series[0].1, Some(2.5));
    assert_eq!(series[1].1, None);
    assert_eq!(series[2].1, None);
}

#[test]
fn refusals_and_other_answers_are_errors_that_say_why() {
    let refused =
        r#"{"status":"error","errorType":"bad_data","error":"1:10: parse error: unexpected"}"#;
    let e = parse_answer("sum(", refused).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Prometheus refused sum(: 1:10: parse error: unexpected"
    );
    assert!(matches!(
        parse_answer("q", "<html>login</html>"),
        Err(QueryError::Answer(_))
    ));
    assert!(matches!(
        parse_answer("q", r#"{"status":"success","data":{}}"#),
        Err(QueryError::Answer(_))
    ));
}
