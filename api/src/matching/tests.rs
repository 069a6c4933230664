use http::HeaderValue;

use super::*;
use crate::policy::{GrpcMethodMatch, ObjectRef, RouteKind, Rule};

/// Request headers of a test case.
type Headers<'a> = &'a [(&'a str, &'a str)];

fn route<M>(name: &str, rules: Vec<Vec<M>>) -> Route<M> {
    Route {
        kind: RouteKind::Http,
        id: ObjectRef {
            namespace: "ns".to_string(),
            name: name.to_string(),
        },
        rules: rules
            .into_iter()
            .enumerate()
            .map(|(index, matches)| Rule {
                index,
                name: None,
                matches,
                filters: Vec::new(),
                backends: Vec::new(),
                timeouts: Default::default(),
                retry: None,
            })
            .collect(),
    }
}

fn path(path: PathMatch) -> HttpMatch {
    HttpMatch {
        path,
        ..HttpMatch::default()
    }
}
fn prefix(p: &str) -> HttpMatch {
    path(PathMatch::Prefix(p.to_string()))
}
fn exact(p: &str) -> HttpMatch {
    path(PathMatch::Exact(p.to_string()))
}
fn regex(p: &str) -> HttpMatch {
    path(PathMatch::Regex(p.to_string()))
}
fn nm(name: &str, value: ValueMatch) -> NameMatch {
    NameMatch {
        name: name.to_string(),
        value,
    }
}
fn ex(v: &str) -> ValueMatch {
    ValueMatch::Exact(v.to_string())
}
fn re(v: &str) -> ValueMatch {
    ValueMatch::Regex(v.to_string())
}

/// Builder steps for test matches.
trait With: Sized {
    fn header(self, name: &str, value: ValueMatch) -> Self;
    fn query(self, name: &str, value: ValueMatch) -> Self;
    fn method(self, method: &str) -> Self;
}
impl With for HttpMatch {
    fn header(mut self, name: &str, value: ValueMatch) -> Self {
        self.headers.push(nm(name, value));
        self
    }
    fn query(mut self, name: &str, value: ValueMatch) -> Self {
        self.query_params.push(nm(name, value));
        self
    }
    fn method(mut self, method: &str) -> Self {
        self.method = Some(method.to_string());
        self
    }
}

fn http(routes: &[Route<HttpMatch>]) -> RouteTable<HttpMatch> {
    RouteTable::<HttpMatch>::compile(routes).unwrap()
}

fn headers(list: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in list {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

/// `(route, rule, match, prefix)` of the winner.
fn find<M>(
    table: &RouteTable<M>,
    method: &str,
    uri: &str,
    hs: &[(&str, &str)],
) -> Option<(usize, usize, usize, Option<String>)> {
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let uri: Uri = uri.parse().unwrap();
    let headers = headers(hs);
    let req = RequestHead {
        method: &method,
        uri: &uri,
        headers: &headers,
    };
    table
        .find(&req)
        .map(|f| (f.route, f.rule, f.matched, f.prefix.map(str::to_string)))
}

fn rule_of(table: &RouteTable<HttpMatch>, uri: &str, hs: &[(&str, &str)]) -> Option<usize> {
    find(table, "GET", uri, hs).map(|(_, rule, _, _)| rule)
}

#[test]
fn gamma_mesh_httproute_matching() {
    let table = http(&[route(
        "mesh-matching",
        vec![
            vec![prefix("/"), prefix("/").header("version", ex("one"))],
            vec![prefix("/v2"), prefix("/").header("version", ex("two"))],
        ],
    )]);
    let backends = ["echo-v1", "echo-v2"];
    let cases: &[(&str, Headers<'_>, &str)] = &[
        ("/", &[], "echo-v1"),
        ("/example", &[], "echo-v1"),
        ("/", &[("Version", "one")], "echo-v1"),
        ("/v2", &[], "echo-v2"),
        ("/v2/example", &[], "echo-v2"),
        ("/", &[("Version", "two")], "echo-v2"),
        ("/v2/", &[], "echo-v2"),
        ("/v2example", &[], "echo-v1"),
        ("/foo/v2/example", &[], "echo-v1"),
    ];
    for (uri, hs, want) in cases {
        let got = rule_of(&table, uri, hs).map(|r| backends[r]);
        assert_eq!(got, Some(*want), "{uri} {hs:?}");
    }
}

#[test]
fn gamma_mesh_httproute_query_param_matching() {
    let whale = || ex("whale");
    let table = http(&[route(
        "mesh-query-param-matching",
        vec![
            vec![prefix("/").query("animal", whale())],
            vec![prefix("/").query("animal", ex("dolphin"))],
            vec![prefix("/path1").query("animal", whale())],
            vec![
                prefix("/")
                    .header("version", ex("one"))
                    .query("animal", whale()),
            ],
            vec![
                prefix("/path3").query("animal", ex("shark")),
                prefix("/path4")
                    .header("version", ex("three"))
                    .query("animal", ex("kraken")),
            ],
            vec![prefix("/path5")],
            vec![prefix("/").query("animal", ex("hydra"))],
        ],
    )]);
    let backends = [
        "echo-v1", "echo-v2", "echo-v1", "echo-v2", "echo-v1", "echo-v1", "echo-v2",
    ];
    let cases: &[(&str, Headers<'_>, Option<&str>)] = &[
        ("/?animal=whale", &[], Some("echo-v1")),
        ("/?animal=dolphin", &[], Some("echo-v2")),
        ("/?animal=whale&otherparam=irrelevant", &[], Some("echo-v1")),
        ("/?animal=dolphin&color=yellow", &[], Some("echo-v2")),
        ("/?color=blue", &[], None),
        ("/?animal=dog", &[], None),
        ("/?animal=whaledolphin", &[], None),
        ("/", &[], None),
        ("/path1?animal=whale", &[], Some("echo-v1")),
        ("/?animal=whale", &[("version", "one")], Some("echo-v2")),
        ("/path3?animal=shark", &[], Some("echo-v1")),
        (
            "/path4?animal=kraken",
            &[("version", "three")],
            Some("echo-v1"),
        ),
        ("/?animal=shark", &[], None),
        ("/path4?animal=kraken", &[], None),
        ("/path5?animal=hydra", &[], Some("echo-v1")),
    ];
    for (uri, hs, want) in cases {
        let got = rule_of(&table, uri, hs).map(|r| backends[r]);
        assert_eq!(got, *want, "{uri} {hs:?}");
    }
    // The two rows that exercise rule order rather than backends.
    assert_eq!(rule_of(&table, "/path1?animal=whale", &[]), Some(2));
    assert_eq!(rule_of(&table, "/path5?animal=hydra", &[]), Some(5));
}

#[test]
fn gamma_redirect_path_rules_are_per_segment_and_report_prefix() {
    let names = [
        "/original-prefix",
        "/full",
        "/path-and-host",
        "/path-and-status",
        "/full-path-and-host",
        "/full-path-and-status",
    ];
    let table = http(&[route(
        "mesh-redirect-path",
        names.iter().map(|p| vec![prefix(p)]).collect(),
    )]);
    let cases = [
        ("/original-prefix/lemon", 0),
        ("/full/path/original", 1),
        ("/path-and-host", 2),
        ("/path-and-status", 3),
        ("/full-path-and-host", 4),
        ("/full-path-and-status", 5),
    ];
    for (uri, rule) in cases {
        let got = find(&table, "GET", uri, &[]);
        assert_eq!(
            got,
            Some((0, rule, 0, Some(names[rule].to_string()))),
            "{uri}"
        );
    }
}

#[test]
fn prefix_is_per_segment_and_ignores_trailing_slash() {
    let cases = [
        ("/abc", "/abc", true),
        ("/abc", "/abc/", true),
        ("/abc", "/abc/def", true),
        ("/abc", "/abcd", false),
        ("/abc", "/ab", false),
        ("/abc", "/", false),
        ("/abc", "/ABC", false),
        ("/abc/", "/abc", true),
        ("/abc/", "/abc/", true),
        ("/abc/", "/abc/def", true),
        ("/abc/", "/abcd", false),
        ("/a/b", "/a/b/c", true),
        ("/a/b", "/a/bc", false),
        ("/", "/", true),
        ("/", "/anything/at/all", true),
        ("/", "*", true),
    ];
    for (p, uri, want) in cases {
        let table = http(&[route("r", vec![vec![prefix(p)]])]);
        let got = find(&table, "GET", uri, &[]);
        assert_eq!(got.is_some(), want, "prefix {p} path {uri}");
        if want {
            assert_eq!(got.unwrap().3.as_deref(), Some(p), "reported prefix");
        }
    }
}

#[test]
fn exact_and_regex_paths_match_the_whole_path() {
    let cases = [
        (exact("/abc"), "/abc", true),
        (exact("/abc"), "/abc/", false),
        (exact("/abc"), "/ABC", false),
        (exact("/abc"), "/abc?x=1", true),
        (regex("/v[0-9]"), "/v2", true),
        (regex("/v[0-9]"), "/v23", false),
        (regex("/v[0-9]"), "/x/v2", false),
        (regex("/a|/ab"), "/ab", true),
        (regex("/a|/ab"), "/abc", false),
        (regex("/(foo|bar)/.*"), "/bar/x", true),
    ];
    for (m, uri, want) in cases {
        let label = format!("{:?} {uri}", m.path);
        let table = http(&[route("r", vec![vec![m]])]);
        let got = find(&table, "GET", uri, &[]);
        assert_eq!(got.is_some(), want, "{label}");
        if let Some(found) = got {
            assert_eq!(found.3, None, "{label}: only prefixes are reported");
        }
    }
}

#[test]
fn path_precedence_exact_then_regex_then_longest_prefix() {
    let table = http(&[route(
        "r",
        vec![
            vec![prefix("/")],
            vec![prefix("/v2/")],
            vec![prefix("/v2/api")],
            vec![regex("/v2/.*")],
            vec![regex("/v2/api/.*")],
            vec![exact("/v2/api/exact")],
        ],
    )]);
    let cases = [
        ("/v2/api/exact", 5),
        ("/v2/api/other", 4),
        ("/v2/other", 3),
        ("/v2/api", 3),
        ("/v2", 1),
        ("/v3", 0),
    ];
    for (uri, rule) in cases {
        assert_eq!(rule_of(&table, uri, &[]), Some(rule), "{uri}");
    }
}

#[test]
fn method_then_headers_then_query_break_prefix_ties() {
    let table = http(&[route(
        "r",
        vec![
            vec![prefix("/").query("a", ex("1")).query("b", ex("2"))],
            vec![prefix("/").header("x", ex("1")).query("a", ex("1"))],
            vec![prefix("/").header("x", ex("1")).header("y", ex("2"))],
            vec![prefix("/").method("POST")],
            vec![prefix("/longer")],
        ],
    )]);
    let all: &[(&str, &str)] = &[("x", "1"), ("y", "2")];
    let cases: &[(&str, &str, Headers<'_>, Option<usize>)] = &[
        ("GET", "/?a=1&b=2", &[], Some(0)),
        ("GET", "/?a=1&b=2", &[("x", "1")], Some(1)),
        ("GET", "/?a=1&b=2", all, Some(2)),
        ("POST", "/?a=1&b=2", all, Some(3)),
        ("POST", "/longer", all, Some(4)),
        ("GET", "/", &[], None),
    ];
    for (method, uri, hs, want) in cases {
        let got = find(&table, method, uri, hs).map(|f| f.1);
        assert_eq!(got, *want, "{method} {uri} {hs:?}");
    }
}

#[test]
fn method_is_an_exact_upper_case_compare() {
    let table = http(&[route(
        "r",
        vec![
            vec![prefix("/").method("GET")],
            vec![prefix("/").method("post")],
        ],
    )]);
    assert_eq!(find(&table, "GET", "/", &[]).map(|f| f.1), Some(0));
    assert_eq!(find(&table, "HEAD", "/", &[]), None);
    assert_eq!(find(&table, "POST", "/", &[]), None);
}

#[test]
fn header_matching() {
    let cases: &[(NameMatch, Headers<'_>, bool)] = &[
        (nm("X-Foo", ex("bar")), &[("x-foo", "bar")], true),
        (nm("x-foo", ex("bar")), &[("X-FOO", "bar")], true),
        (nm("X-Foo", ex("bar")), &[("x-foo", "Bar")], false),
        (nm("X-Foo", ex("bar")), &[("x-foo", "bar ")], false),
        (nm("X-Foo", ex("bar")), &[], false),
        (nm("X-Foo", ex("")), &[("x-foo", "")], true),
        (
            nm("X-Foo", ex("b")),
            &[("x-foo", "a"), ("x-foo", "b")],
            true,
        ),
        (
            nm("X-Foo", ex("c")),
            &[("x-foo", "a"), ("x-foo", "b")],
            false,
        ),
        (nm("X-Foo", ex("a")), &[("x-foo", "a, b")], false),
        (nm("X-Foo", re("v[0-9]+")), &[("x-foo", "v12")], true),
        (nm("X-Foo", re("v[0-9]+")), &[("x-foo", "v12x")], false),
        (
            nm("X-Foo", re("v[0-9]+")),
            &[("x-foo", "x"), ("x-foo", "v1")],
            true,
        ),
        (nm("Host", ex("echo")), &[("host", "echo")], true),
    ];
    for (m, hs, want) in cases {
        let table = http(&[route(
            "r",
            vec![vec![prefix("/").header(&m.name, m.value.clone())]],
        )]);
        assert_eq!(
            find(&table, "GET", "/", hs).is_some(),
            *want,
            "{m:?} {hs:?}"
        );
    }
}

#[test]
fn header_matches_are_anded() {
    let table = http(&[route(
        "r",
        vec![vec![prefix("/").header("a", ex("1")).header("b", ex("2"))]],
    )]);
    assert!(find(&table, "GET", "/", &[("a", "1"), ("b", "2")]).is_some());
    assert!(find(&table, "GET", "/", &[("a", "1")]).is_none());
    assert!(find(&table, "GET", "/", &[("a", "1"), ("b", "3")]).is_none());
}

#[test]
fn host_match_falls_back_to_the_authority() {
    let table = http(&[route(
        "r",
        vec![vec![prefix("/").header("host", ex("echo:7070"))]],
    )]);
    assert!(find(&table, "GET", "http://echo:7070/x", &[]).is_some());
    assert!(find(&table, "GET", "http://other:7070/x", &[]).is_none());
    // A Host header present takes precedence over the authority.
    assert!(find(&table, "GET", "http://echo:7070/x", &[("host", "other")]).is_none());
}

#[test]
fn query_param_matching() {
    let cases: &[(NameMatch, &str, bool)] = &[
        (nm("animal", ex("whale")), "/?animal=whale", true),
        (nm("animal", ex("whale")), "/?animal=Whale", false),
        (nm("animal", ex("whale")), "/?Animal=whale", false),
        (nm("animal", ex("whale")), "/?x=1&animal=whale&y=2", true),
        (nm("animal", ex("whale")), "/?animal=wh%61le", true),
        (nm("animal", ex("whale")), "/?an%69mal=whale", true),
        (
            nm("animal", ex("whale")),
            "/?animal=dog&animal=whale",
            false,
        ),
        (nm("animal", ex("whale")), "/?animal=whale&animal=dog", true),
        (nm("animal", ex("whale")), "/?&&animal=whale&", true),
        (nm("animal", ex("whale")), "/?animal", false),
        (nm("animal", ex("")), "/?animal", true),
        (nm("animal", ex("")), "/?animal=", true),
        (nm("animal", ex("")), "/?other", false),
        (nm("q", ex("a b")), "/?q=a%20b", true),
        (nm("q", ex("a b")), "/?q=a+b", false),
        (nm("q", ex("a+b")), "/?q=a+b", true),
        (nm("q", ex("a=b")), "/?q=a=b", true),
        (nm("q", ex("%zz")), "/?q=%zz", true),
        (nm("q", re("[a-z]+ [a-z]+")), "/?q=ab%20cd", true),
        (nm("q", re("[a-z]+")), "/?q=ab%20cd", false),
        (nm("q", re("[a-z]+")), "/?q=abc", true),
        (nm("q", re("b")), "/?q=abc", false),
        (nm("q", ex("1")), "/", false),
        (nm("q", ex("1")), "/?", false),
    ];
    for (m, uri, want) in cases {
        let table = http(&[route(
            "r",
            vec![vec![prefix("/").query(&m.name, m.value.clone())]],
        )]);
        assert_eq!(
            find(&table, "GET", uri, &[]).is_some(),
            *want,
            "{m:?} {uri}"
        );
    }
}

#[test]
fn ties_go_to_earlier_route_then_rule_then_match() {
    let table = http(&[
        route(
            "older",
            vec![
                vec![prefix("/a")],
                vec![prefix("/b"), prefix("/c"), prefix("/c/")],
            ],
        ),
        route(
            "newer",
            vec![
                vec![prefix("/a")],
                vec![prefix("/a/long")],
                vec![prefix("/b")],
            ],
        ),
    ]);
    let cases = [
        ("/a", (0, 0, 0)),
        ("/b", (0, 1, 0)),
        ("/c/x", (0, 1, 1)),
        ("/a/long/x", (1, 1, 0)),
    ];
    for (uri, (route, rule, matched)) in cases {
        let got = find(&table, "GET", uri, &[]).map(|f| (f.0, f.1, f.2));
        assert_eq!(got, Some((route, rule, matched)), "{uri}");
    }
    // The same rule twice in one rule's matches: the earlier one wins.
    let table = http(&[route("r", vec![vec![prefix("/x"), prefix("/x")]])]);
    assert_eq!(find(&table, "GET", "/x", &[]).map(|f| f.2), Some(0));
}

#[test]
fn rule_without_matches_matches_everything() {
    let table = http(&[route("r", vec![vec![exact("/only")], vec![]])]);
    assert_eq!(
        find(&table, "DELETE", "/any/thing?x=y", &[]),
        Some((0, 1, 0, Some("/".to_string())))
    );
    assert_eq!(rule_of(&table, "/only", &[]), Some(0));
}

#[test]
fn empty_table_matches_nothing() {
    assert_eq!(
        find(&RouteTable::<HttpMatch>::default(), "GET", "/", &[]),
        None
    );
    assert_eq!(find(&http(&[]), "GET", "/", &[]), None);
}

#[test]
fn find_all_lists_every_match_best_first() {
    let table = http(&[route(
        "r",
        vec![vec![prefix("/")], vec![prefix("/a")], vec![exact("/b")]],
    )]);
    let method = Method::GET;
    let uri: Uri = "/a/b".parse().unwrap();
    let headers = HeaderMap::new();
    let req = RequestHead {
        method: &method,
        uri: &uri,
        headers: &headers,
    };
    let rules: Vec<usize> = table.find_all(&req).map(|f| f.rule).collect();
    assert_eq!(rules, [1, 0]);
}

#[test]
fn compile_errors_name_the_culprit() {
    let bad_regex = [route("r", vec![vec![regex("/(unclosed")]])];
    let err = RouteTable::<HttpMatch>::compile(&bad_regex).unwrap_err();
    assert!(matches!(&err, MatchError::Regex { pattern, .. } if pattern == "/(unclosed"));
    assert!(err.to_string().contains("/(unclosed"), "{err}");

    let bad_name = [route(
        "r",
        vec![vec![prefix("/").header("bad name", ex("x"))]],
    )];
    let err = RouteTable::<HttpMatch>::compile(&bad_name).unwrap_err();
    assert_eq!(
        err,
        MatchError::HeaderName {
            name: "bad name".to_string()
        }
    );
    assert!(err.to_string().contains("\"bad name\""), "{err}");

    let bad_query = [route("r", vec![vec![prefix("/").query("q", re("["))]])];
    assert!(RouteTable::<HttpMatch>::compile(&bad_query).is_err());
}

#[test]
fn validate_regex_uses_the_matcher_compiler() {
    assert_eq!(validate_regex("/v[0-9]+/.*"), Ok(()));
    assert!(validate_regex("(").is_err());
    // Would escape the anchoring group if only the anchored form were compiled.
    assert!(validate_regex("a)|(b").is_err());
    assert!(
        matches!(validate_regex("*"), Err(MatchError::Regex { pattern, .. }) if pattern == "*")
    );
}

fn grpc(service: Option<ValueMatch>, method: Option<ValueMatch>) -> GrpcMatch {
    GrpcMatch {
        method: Some(GrpcMethodMatch { service, method }),
        headers: Vec::new(),
    }
}
fn grpc_headers(mut m: GrpcMatch, name: &str, value: &str) -> GrpcMatch {
    m.headers.push(nm(name, ex(value)));
    m
}

#[test]
fn grpc_service_and_method_matching() {
    let echo = "/proto.EchoTestService/Echo";
    let cases: &[(GrpcMatch, &str, bool)] = &[
        (GrpcMatch::default(), echo, true),
        (GrpcMatch::default(), "/not-grpc", true),
        (grpc(Some(ex("proto.EchoTestService")), None), echo, true),
        (
            grpc(Some(ex("proto.EchoTestService")), None),
            "/proto.EchoTestServiceX/Echo",
            false,
        ),
        (
            grpc(Some(ex("proto.EchoTestService")), None),
            "/proto.EchoTestService",
            false,
        ),
        (grpc(None, Some(ex("Echo"))), echo, true),
        (
            grpc(None, Some(ex("Echo"))),
            "/proto.EchoTestService/EchoX",
            false,
        ),
        (grpc(None, Some(ex("echo"))), echo, false),
        (
            grpc(Some(ex("proto.EchoTestService")), Some(ex("Echo"))),
            echo,
            true,
        ),
        (
            grpc(Some(ex("proto.EchoTestService")), Some(ex("Other"))),
            echo,
            false,
        ),
        (grpc(Some(re(r"proto\..*")), None), echo, true),
        (grpc(Some(re("Echo")), None), echo, false),
        (grpc(None, Some(re("E.*o"))), echo, true),
        (grpc(None, Some(ex("Echo"))), "/a/b/Echo", false),
        (grpc(None, Some(ex("Echo"))), "//Echo", false),
        (
            grpc_headers(GrpcMatch::default(), "x-test-case", "set"),
            echo,
            false,
        ),
    ];
    for (m, uri, want) in cases {
        let table = RouteTable::<GrpcMatch>::compile(&[route("g", vec![vec![m.clone()]])]).unwrap();
        assert_eq!(
            find(&table, "POST", uri, &[]).is_some(),
            *want,
            "{m:?} {uri}"
        );
    }
}

#[test]
fn grpc_precedence() {
    let table = RouteTable::<GrpcMatch>::compile(&[route(
        "g",
        vec![
            vec![GrpcMatch::default()],
            vec![grpc_headers(grpc(None, Some(ex("Echo"))), "x", "1")],
            vec![grpc(Some(re("proto.EchoTestService")), None)],
            vec![grpc(Some(ex("proto.EchoTestService")), None)],
            vec![grpc(Some(ex("proto.EchoTestService")), Some(re("Echo")))],
            vec![grpc(Some(ex("proto.EchoTestService")), Some(ex("Echo")))],
            vec![grpc_headers(
                grpc(Some(ex("proto.EchoTestService")), Some(ex("Echo"))),
                "x",
                "1",
            )],
            vec![grpc_headers(GrpcMatch::default(), "x-test-case", "set")],
        ],
    )])
    .unwrap();
    let echo = "/proto.EchoTestService/Echo";
    let cases: &[(&str, Headers<'_>, usize)] = &[
        (echo, &[("x", "1")], 6),
        (echo, &[], 5),
        ("/proto.EchoTestService/Other", &[], 3),
        ("/proto.EchoTestService/Other", &[("x", "1")], 3),
        ("/other.Service/Echo", &[("x", "1")], 1),
        ("/other.Service/Other", &[("x-test-case", "set")], 7),
        ("/other.Service/Other", &[], 0),
    ];
    for (uri, hs, rule) in cases {
        assert_eq!(
            find(&table, "POST", uri, hs).map(|f| f.1),
            Some(*rule),
            "{uri} {hs:?}"
        );
    }
    // Regex service ranks after exact but before no service.
    let table = RouteTable::<GrpcMatch>::compile(&[route(
        "g",
        vec![
            vec![grpc(None, Some(ex("Echo")))],
            vec![grpc(Some(re("proto.*")), None)],
        ],
    )])
    .unwrap();
    assert_eq!(find(&table, "POST", echo, &[]).map(|f| f.1), Some(1));
    // No prefix for gRPC winners.
    assert_eq!(find(&table, "POST", echo, &[]).unwrap().3, None);
}

#[test]
fn grpc_header_modifier_test_cases_select_by_header() {
    let cases = ["set", "add", "remove", "multi"];
    let table = RouteTable::<GrpcMatch>::compile(&[route(
        "grpc-request-header-modifier",
        cases
            .iter()
            .map(|c| vec![grpc_headers(GrpcMatch::default(), "x-test-case", c)])
            .collect(),
    )])
    .unwrap();
    for (rule, case) in cases.iter().enumerate() {
        let hs = [("x-test-case", *case)];
        let got = find(&table, "POST", "/proto.EchoTestService/Echo", &hs).map(|f| f.1);
        assert_eq!(got, Some(rule), "{case}");
    }
    assert_eq!(
        find(&table, "POST", "/proto.EchoTestService/Echo", &[]),
        None
    );
}
