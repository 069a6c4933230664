//! Table tests of `stat`'s pure parts: the text format, deltas, sums, success and quantiles.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::BTreeMap;

use super::compute::*;
use super::text::{self, Sample};
use super::{format_latency, parse_duration, table};

fn outbound() -> Filter {
    Filter {
        direction: "outbound".into(),
        ..Filter::default()
    }
}

#[test]
fn the_text_format_is_read_with_escapes_comments_infinities_and_timestamps() {
    let page = r#"# HELP trellis_requests_total HTTP requests
# TYPE trellis_requests_total counter
trellis_requests_total{direction="outbound",route="shop/a \"b\"",rule="x\\y\nz",status="200"} 7
  
trellis_request_duration_seconds_bucket{le="+Inf"} 3 1700000000000
up 1
weird{a="}",b=","} -Inf
nan_one NaN
sci 1.5e3
trailing_comma{a="1",} 2
"#;
    let samples = text::parse(page).unwrap();
    assert_eq!(samples.len(), 7);
    assert_eq!(samples[0].label("route"), "shop/a \"b\"");
    assert_eq!(samples[0].label("rule"), "x\\y\nz");
    assert_eq!(samples[0].label("missing"), "");
    assert_eq!(samples[0].value, 7.0);
    assert_eq!(samples[1].value, 3.0);
    assert_eq!(samples[1].label("le"), "+Inf");
    assert_eq!(samples[2].name, "up");
    assert!(samples[2].labels.is_empty());
    assert_eq!(samples[3].label("a"), "}");
    assert_eq!(samples[3].label("b"), ",");
    assert_eq!(samples[3].value, f64::NEG_INFINITY);
    assert!(samples[4].value.is_nan());
    assert_eq!(samples[5].value, 1500.0);
    assert_eq!(samples[6].label("a"), "1");
}

#[test]
fn malformed_lines_are_errors_that_name_the_line() {
    for (page, line) in [
        ("ok 1\nbroken{a=\"1\" 2\n", 2),
        ("no_value\n", 1),
        ("x{a=1} 2\n", 1),
        ("x{a=\"unterminated} 2\n", 1),
        ("x{a=\"\\q\"} 2\n", 1),
        ("x 1 2 3\n", 1),
        ("x one\n", 1),
        ("# fine\n1x 2\n", 2),
        ("x 1 notatime\n", 1),
    ] {
        let e = text::parse(page).unwrap_err();
        assert_eq!(e.line, line, "{page:?}: {e}");
    }
}

fn sample(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
    Sample {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        value,
    }
}

/// A request series of route `shop/r` rule `0` to `backend`.
fn requests(backend: &str, status: &str, grpc: &str, value: f64) -> Sample {
    sample(
        REQUESTS,
        &[
            ("direction", "outbound"),
            ("parent", "shop/catalog:80"),
            ("route", "shop/r"),
            ("rule", "0"),
            ("backend", backend),
            ("status", status),
            ("grpc_status", grpc),
        ],
        value,
    )
}

fn bucket(backend: &str, le: &str, value: f64) -> Sample {
    sample(
        BUCKETS,
        &[
            ("direction", "outbound"),
            ("parent", "shop/catalog:80"),
            ("route", "shop/r"),
            ("rule", "0"),
            ("backend", backend),
            ("status", "200"),
            ("le", le),
        ],
        value,
    )
}

#[test]
fn success_is_anything_but_5xx_and_the_grpc_codes_that_map_to_5xx() {
    let cases = [
        ("200", "", true),
        ("204", "", true),
        ("301", "", true),
        ("404", "", true),
        ("429", "", true),
        ("499", "", true),
        ("500", "", false),
        ("503", "", false),
        ("504", "", false),
        ("599", "", false),
        ("", "", false),
        ("abc", "", false),
        ("200", "0", true),
        ("200", "1", true),  // CANCELLED: the client's choice
        ("200", "3", true),  // INVALID_ARGUMENT
        ("200", "5", true),  // NOT_FOUND
        ("200", "7", true),  // PERMISSION_DENIED
        ("200", "8", true),  // RESOURCE_EXHAUSTED maps to 429
        ("200", "16", true), // UNAUTHENTICATED
        ("200", "2", false), // UNKNOWN
        ("200", "4", false), // DEADLINE_EXCEEDED
        ("200", "12", false),
        ("200", "13", false),
        ("200", "14", false),
        ("200", "15", false),
        ("200", "other", false),
        // The call's status decides, whatever the HTTP status says.
        ("503", "0", true),
    ];
    for (status, grpc, want) in cases {
        assert_eq!(is_success(status, grpc), want, "{status} {grpc:?}");
    }
}

#[test]
fn quantiles_interpolate_within_buckets_as_histogram_quantile_does() {
    let inf = f64::INFINITY;
    let b = [(0.1, 10.0), (0.2, 20.0), (0.4, 40.0), (inf, 40.0)];
    type Case<'a> = (f64, &'a [(f64, f64)], Option<f64>);
    let cases: [Case<'_>; 12] = [
        (0.25, &b, Some(0.1)),
        (0.5, &b, Some(0.2)),
        (0.75, &b, Some(0.3)),
        (0.99, &b, Some(0.396)),
        (0.05, &b, Some(0.02)),
        // The rank falls in the +Inf bucket: the highest finite bound.
        (0.9, &[(0.1, 5.0), (inf, 10.0)], Some(0.1)),
        // Out of order input is sorted; a count that goes down is taken as flat.
        (0.5, &[(inf, 10.0), (0.2, 8.0), (0.1, 10.0)], Some(0.05)),
        // A first bucket bounded at or below zero answers its bound.
        (0.2, &[(0.0, 5.0), (1.0, 10.0), (inf, 10.0)], Some(0.0)),
        (1.5, &b, Some(inf)),
        (-0.5, &b, Some(f64::NEG_INFINITY)),
        // No +Inf bucket, a single bucket, or no observations: no answer (NaN in PromQL).
        (0.5, &[(0.1, 5.0), (0.2, 10.0)], None),
        (0.5, &[(inf, 10.0)], None),
    ];
    for (q, buckets, want) in cases {
        let got = histogram_quantile(q, buckets);
        match (got, want) {
            (Some(g), Some(w)) => assert!(g == w || (g - w).abs() < 1e-9, "q={q}: {g} != {w}"),
            _ => assert_eq!(got, want, "q={q} {buckets:?}"),
        }
    }
    assert_eq!(
        histogram_quantile(0.5, &[(0.1, 0.0), (0.2, 0.0), (inf, 0.0)]),
        None
    );
    assert_eq!(histogram_quantile(f64::NAN, &b), None);
}

#[test]
fn deltas_take_new_series_from_zero_and_a_reset_series_from_its_new_value() {
    let filter = outbound();
    let before = counters(
        &[
            requests("shop/v1:80", "200", "", 100.0),
            requests("shop/v2:80", "200", "", 50.0),
            requests("shop/v3:80", "200", "", 9.0),
        ],
        &filter,
    );
    let after = counters(
        &[
            requests("shop/v1:80", "200", "", 130.0), // +30
            requests("shop/v2:80", "200", "", 4.0),   // restarted: 4 new
            requests("shop/v3:80", "200", "", 9.0),   // quiet
            requests("shop/v1:80", "503", "", 2.0),   // new series
        ],
        &filter,
    );
    let d = delta(&before, &after);
    let got: Vec<(String, String, f64)> = d
        .iter()
        .map(|(id, v)| {
            (
                id.labels["backend"].clone(),
                id.labels["status"].clone(),
                *v,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("shop/v1:80".into(), "200".into(), 30.0),
            ("shop/v1:80".into(), "503".into(), 2.0),
            ("shop/v2:80".into(), "200".into(), 4.0),
            ("shop/v3:80".into(), "200".into(), 0.0),
        ]
    );
}

#[test]
fn filters_keep_one_direction_route_and_parent() {
    let mut inbound = requests("shop/v1:80", "200", "", 1.0);
    inbound.labels.insert("direction".into(), "inbound".into());
    let mut other_route = requests("shop/v1:80", "200", "", 1.0);
    other_route
        .labels
        .insert("route".into(), "shop/other".into());
    let mut other_parent = requests("shop/v1:80", "200", "", 1.0);
    other_parent
        .labels
        .insert("parent".into(), "shop/catalog-admin:80".into());
    let mut other_port = requests("shop/v1:80", "200", "", 1.0);
    other_port
        .labels
        .insert("parent".into(), "shop/catalog:8080".into());
    let unrelated = sample("trellis_retries_total", &[("direction", "outbound")], 1.0);
    let all = [
        requests("shop/v1:80", "200", "", 1.0),
        inbound,
        other_route,
        other_parent,
        other_port,
        unrelated,
    ];
    let count = |filter: &Filter| counters(&all, filter).len();
    assert_eq!(count(&outbound()), 4);
    let route = Filter {
        route: Some("shop/r".into()),
        ..outbound()
    };
    assert_eq!(count(&route), 3);
    let parent = Filter {
        parent: Some(ParentFilter::parse("catalog.shop").unwrap()),
        ..outbound()
    };
    assert_eq!(count(&parent), 3);
    let parent_port = Filter {
        parent: Some(ParentFilter::parse("catalog.shop:80").unwrap()),
        ..outbound()
    };
    assert_eq!(count(&parent_port), 2);
    let inbound = Filter {
        direction: "inbound".into(),
        ..Filter::default()
    };
    assert_eq!(count(&inbound), 1);
}

#[test]
fn parent_filters_are_written_as_users_name_services() {
    let p = |s| ParentFilter::parse(s);
    let want = |ns: &str, name: &str, port| ParentFilter {
        namespace: ns.into(),
        name: name.into(),
        port,
    };
    assert_eq!(p("catalog.shop"), Ok(want("shop", "catalog", None)));
    assert_eq!(p("catalog.shop:80"), Ok(want("shop", "catalog", Some(80))));
    assert_eq!(p("shop/catalog:80"), Ok(want("shop", "catalog", Some(80))));
    assert_eq!(p("shop/catalog"), Ok(want("shop", "catalog", None)));
    for bad in [
        "catalog",
        "catalog.",
        ".shop",
        "catalog.shop:x",
        "a.b.c",
        "",
    ] {
        assert!(p(bad).is_err(), "{bad}");
    }
}

#[test]
fn rows_sum_sidecars_and_read_success_rate_rate_and_percentiles() {
    let filter = outbound();
    // Two client sidecars over 10 s each.
    let a = counters(
        &[
            requests("shop/v1:80", "200", "", 90.0),
            requests("shop/v1:80", "503", "", 10.0),
            bucket("shop/v1:80", "0.001", 50.0),
            bucket("shop/v1:80", "0.002", 100.0),
            bucket("shop/v1:80", "+Inf", 100.0),
        ],
        &filter,
    );
    let b = counters(
        &[
            requests("shop/v1:80", "200", "", 100.0),
            requests("shop/v2:80", "200", "0", 5.0),
            requests("shop/v2:80", "200", "14", 5.0),
            bucket("shop/v1:80", "0.001", 50.0),
            bucket("shop/v1:80", "0.002", 100.0),
            bucket("shop/v1:80", "+Inf", 100.0),
        ],
        &filter,
    );
    let mut tallies = BTreeMap::new();
    tally(&mut tallies, &a, Some(10.0));
    tally(&mut tallies, &b, Some(20.0));
    let table_rows = rows(&tallies);
    assert_eq!(table_rows.len(), 2);
    let v1 = &table_rows[0];
    assert_eq!(v1.key.backend, "shop/v1:80");
    assert_eq!(v1.key.parent, "shop/catalog:80");
    assert_eq!(v1.key.route, "shop/r");
    assert_eq!(v1.requests, 200.0);
    assert_eq!(v1.success_rate, Some(0.95));
    // 100 over 10 s plus 100 over 20 s.
    assert_eq!(v1.requests_per_second, Some(15.0));
    assert_eq!(v1.p50_seconds, Some(0.001));
    assert!((v1.p95_seconds.unwrap() - 0.0019).abs() < 1e-12);
    let v2 = &table_rows[1];
    assert_eq!(v2.requests, 10.0);
    assert_eq!(v2.success_rate, Some(0.5));
    assert_eq!(v2.requests_per_second, Some(0.5));
    // No buckets for it: no percentiles.
    assert_eq!(v2.p99_seconds, None);

    // Totals since start: no rate; a row without requests has no success rate.
    let mut totals = BTreeMap::new();
    tally(
        &mut totals,
        &counters(&[requests("shop/v3:80", "200", "", 0.0)], &filter),
        None,
    );
    let r = &rows(&totals)[0];
    assert_eq!(r.requests_per_second, None);
    assert_eq!(r.success_rate, None);
}

#[test]
fn the_table_is_aligned_sorted_and_dashes_what_is_unknown() {
    let mut tallies = BTreeMap::new();
    let filter = outbound();
    let mut redirect = requests("", "301", "", 3.0);
    redirect.labels.insert("rule".into(), "1".into());
    tally(
        &mut tallies,
        &counters(
            &[
                requests("shop/v2:80", "200", "", 1.0),
                requests("shop/v1:80", "200", "", 4.0),
                redirect,
                bucket("shop/v1:80", "0.0005", 2.0),
                bucket("shop/v1:80", "0.001", 4.0),
                bucket("shop/v1:80", "+Inf", 4.0),
            ],
            &filter,
        ),
        None,
    );
    let out = table(&rows(&tallies));
    let want = "\
PARENT           ROUTE   RULE  BACKEND     REQUESTS  SUCCESS  RPS     P50     P95     P99
shop/catalog:80  shop/r  0     shop/v1:80         4  100.00%    -  0.50ms  0.95ms  0.99ms
shop/catalog:80  shop/r  0     shop/v2:80         1  100.00%    -       -       -       -
shop/catalog:80  shop/r  1     -                  3  100.00%    -       -       -       -
";
    assert_eq!(out, want);
}

#[test]
fn latencies_and_durations_read_as_people_write_them() {
    assert_eq!(format_latency(None), "-");
    assert_eq!(format_latency(Some(0.00042)), "0.42ms");
    assert_eq!(format_latency(Some(0.0126)), "13ms");
    assert_eq!(format_latency(Some(0.25)), "250ms");
    assert_eq!(format_latency(Some(1.5)), "1.50s");
    assert_eq!(parse_duration("0"), Ok(std::time::Duration::ZERO));
    assert_eq!(
        parse_duration("500ms"),
        Ok(std::time::Duration::from_millis(500))
    );
    assert_eq!(
        parse_duration("10s"),
        Ok(std::time::Duration::from_secs(10))
    );
    assert_eq!(
        parse_duration("2m"),
        Ok(std::time::Duration::from_secs(120))
    );
    assert!(parse_duration("1h").is_err());
    assert!(parse_duration("s").is_err());
}
