use super::*;

fn hm(set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]) -> CompiledHeaderModifier {
    let pairs = |list: &[(&str, &str)]| {
        list.iter()
            .map(|(name, value)| Header {
                name: name.to_string(),
                value: value.to_string(),
            })
            .collect()
    };
    CompiledHeaderModifier::compile(&HeaderModifier {
        set: pairs(set),
        add: pairs(add),
        remove: remove.iter().map(|n| n.to_string()).collect(),
    })
    .unwrap()
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

/// The header as the conformance echo server reports it: values joined with `,`.
fn joined(map: &HeaderMap, name: &str) -> Option<String> {
    let values: Vec<&str> = map
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

type Case<'a> = (
    &'a [(&'a str, &'a str)],
    &'a [(&'a str, &'a str)],
    &'a [&'a str],
);

fn check(m: &CompiledHeaderModifier, (sent, want, absent): Case<'_>) {
    let mut map = headers(sent);
    m.apply(&mut map);
    for (name, value) in want {
        assert_eq!(
            joined(&map, name).as_deref(),
            Some(*value),
            "{name} after {sent:?}"
        );
    }
    for name in absent {
        assert_eq!(joined(&map, name), None, "{name} after {sent:?}");
    }
    let expected_names: usize = want.len();
    assert_eq!(map.keys_len(), expected_names, "no other header in {map:?}");
}

#[test]
fn gamma_request_header_modifier() {
    let set = hm(&[("X-Header-Set", "set-overwrites-values")], &[], &[]);
    let add = hm(&[], &[("X-Header-Add", "add-appends-values")], &[]);
    let remove = hm(&[], &[], &["X-Header-Remove"]);
    let multiple = hm(
        &[
            ("X-Header-Set-1", "header-set-1"),
            ("X-Header-Set-2", "header-set-2"),
        ],
        &[
            ("X-Header-Add-1", "header-add-1"),
            ("X-Header-Add-2", "header-add-2"),
            ("X-Header-Add-3", "header-add-3"),
        ],
        &["X-Header-Remove-1", "X-Header-Remove-2"],
    );
    let case = hm(
        &[("X-Header-Set", "header-set")],
        &[("X-Header-Add", "header-add")],
        &["X-Header-Remove"],
    );
    let other = ("Some-Other-Header", "val");
    check(
        &set,
        (
            &[other],
            &[other, ("X-Header-Set", "set-overwrites-values")],
            &[],
        ),
    );
    check(
        &set,
        (
            &[other, ("X-Header-Set", "some-other-value")],
            &[other, ("X-Header-Set", "set-overwrites-values")],
            &[],
        ),
    );
    check(
        &add,
        (
            &[other],
            &[other, ("X-Header-Add", "add-appends-values")],
            &[],
        ),
    );
    check(
        &add,
        (
            &[other, ("X-Header-Add", "some-other-value")],
            &[
                other,
                ("X-Header-Add", "some-other-value,add-appends-values"),
            ],
            &[],
        ),
    );
    check(
        &remove,
        (&[("X-Header-Remove", "val")], &[], &["X-Header-Remove"]),
    );
    check(
        &multiple,
        (
            &[
                ("X-Header-Set-2", "set-val-2"),
                ("X-Header-Add-2", "add-val-2"),
                ("X-Header-Remove-2", "remove-val-2"),
                ("Another-Header", "another-header-val"),
            ],
            &[
                ("X-Header-Set-1", "header-set-1"),
                ("X-Header-Set-2", "header-set-2"),
                ("X-Header-Add-1", "header-add-1"),
                ("X-Header-Add-2", "add-val-2,header-add-2"),
                ("X-Header-Add-3", "header-add-3"),
                ("Another-Header", "another-header-val"),
            ],
            &["X-Header-Remove-1", "X-Header-Remove-2"],
        ),
    );
    check(
        &case,
        (
            &[
                ("x-header-set", "original-val-set"),
                ("x-header-add", "original-val-add"),
                ("x-header-remove", "original-val-remove"),
                ("Another-Header", "another-header-val"),
            ],
            &[
                ("X-Header-Set", "header-set"),
                ("X-Header-Add", "original-val-add,header-add"),
                ("Another-Header", "another-header-val"),
            ],
            &["x-header-remove", "X-Header-Remove"],
        ),
    );
}

#[test]
fn gamma_rewrite_path_and_modify_headers() {
    let m = hm(
        &[("X-Header-Set", "set-overwrites-values")],
        &[
            ("X-Header-Add", "header-val-1"),
            ("X-Header-Add-Append", "header-val-2"),
        ],
        &["X-Header-Remove"],
    );
    check(
        &m,
        (
            &[
                ("X-Header-Remove", "remove-val"),
                ("X-Header-Add-Append", "append-val-1"),
                ("X-Header-Set", "set-val"),
            ],
            &[
                ("X-Header-Add", "header-val-1"),
                ("X-Header-Add-Append", "append-val-1,header-val-2"),
                ("X-Header-Set", "set-overwrites-values"),
            ],
            &["X-Header-Remove"],
        ),
    );
}

#[test]
fn gamma_grpc_request_header_modifier() {
    let multi = hm(
        &[
            ("x-header-set-1", "header-set-1"),
            ("x-header-set-2", "header-set-2"),
        ],
        &[
            ("x-header-add-1", "header-add-1"),
            ("x-header-add-2", "header-add-2"),
        ],
        &["x-header-remove-1", "x-header-remove-2"],
    );
    check(
        &multi,
        (
            &[
                ("x-test-case", "multi"),
                ("x-header-set-2", "set-header-2"),
                ("x-header-add-2", "add-header-2"),
                ("x-header-remove-2", "should-be-removed-2"),
            ],
            &[
                ("x-test-case", "multi"),
                ("x-header-set-1", "header-set-1"),
                ("x-header-set-2", "header-set-2"),
                ("x-header-add-1", "header-add-1"),
                ("x-header-add-2", "add-header-2,header-add-2"),
            ],
            &["x-header-remove-1", "x-header-remove-2"],
        ),
    );
}

#[test]
fn set_replaces_every_value_and_remove_drops_every_value() {
    let m = hm(&[("a", "new")], &[], &["b"]);
    check(
        &m,
        (
            &[("a", "1"), ("A", "2"), ("b", "1"), ("B", "2")],
            &[("a", "new")],
            &["b"],
        ),
    );
}

#[test]
fn overlapping_lists_apply_set_then_add_then_remove() {
    let m = hm(&[("x", "set")], &[("x", "add"), ("y", "add")], &["y"]);
    check(
        &m,
        (&[("x", "old"), ("y", "old")], &[("x", "set,add")], &["y"]),
    );
    // An empty modifier changes nothing.
    check(
        &CompiledHeaderModifier::default(),
        (&[("x", "1")], &[("x", "1")], &[]),
    );
}

#[test]
fn header_modifier_errors_name_the_header() {
    let bad = |set: Vec<Header>, remove: Vec<String>| {
        CompiledHeaderModifier::try_from(&HeaderModifier {
            set,
            add: Vec::new(),
            remove,
        })
        .unwrap_err()
    };
    let header = |name: &str, value: &str| Header {
        name: name.to_string(),
        value: value.to_string(),
    };
    let err = bad(vec![header("bad name", "x")], Vec::new());
    assert_eq!(
        err,
        FilterError::HeaderName {
            name: "bad name".to_string()
        }
    );
    assert!(err.to_string().contains("\"bad name\""), "{err}");
    let err = bad(vec![header("x-ok", "line\nbreak")], Vec::new());
    assert!(matches!(&err, FilterError::HeaderValue { name, .. } if name == "x-ok"));
    assert!(err.to_string().contains("x-ok"), "{err}");
    let err = bad(Vec::new(), vec!["".to_string()]);
    assert_eq!(
        err,
        FilterError::HeaderName {
            name: String::new()
        }
    );
}

fn prefix_rewrite(replacement: &str, path: &str, prefix: &str) -> String {
    let m = PathModifier::ReplacePrefixMatch(replacement.to_string());
    rewrite_path(&m, path, Some(prefix))
}

#[test]
fn replace_prefix_match_spec_table() {
    let cases = [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/bar", "/foo", "/", "/bar"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
        ("/foo/bar/baz", "/foo/bar", "/x/y", "/x/y/baz"),
        ("/anything", "/", "/api", "/api/anything"),
        // GAMMA §3.12 and §3.8.
        ("/prefix/one/two", "/prefix/one", "/one", "/one/two"),
        ("/strip-prefix/three", "/strip-prefix", "/", "/three"),
        ("/strip-prefix", "/strip-prefix", "/", "/"),
        (
            "/prefix/rewrite-path-and-modify-headers/one",
            "/prefix/rewrite-path-and-modify-headers",
            "/prefix",
            "/prefix/one",
        ),
        (
            "/original-prefix/lemon",
            "/original-prefix",
            "/replacement-prefix",
            "/replacement-prefix/lemon",
        ),
        (
            "/path-and-host",
            "/path-and-host",
            "/replacement-prefix",
            "/replacement-prefix",
        ),
        // A prefix that did not select the path leaves it alone.
        ("/foobar", "/foo", "/xyz", "/foobar"),
        ("/other", "/foo", "/xyz", "/other"),
    ];
    for (path, prefix, replacement, want) in cases {
        assert_eq!(
            prefix_rewrite(replacement, path, prefix),
            want,
            "{path} {prefix} {replacement}"
        );
    }
    let m = PathModifier::ReplacePrefixMatch("/xyz".to_string());
    assert_eq!(rewrite_path(&m, "/foo/bar", None), "/foo/bar");
}

#[test]
fn replace_full_path() {
    let full = |r: &str| PathModifier::ReplaceFullPath(r.to_string());
    let cases = [
        ("/one", "/full/one/two", Some("/full/one"), "/one"),
        (
            "/test",
            "/full/rewrite-path-and-modify-headers/test",
            Some("/full"),
            "/test",
        ),
        (
            "/full-path-replacement",
            "/full/path/original",
            None,
            "/full-path-replacement",
        ),
        ("/x/", "/a/b", None, "/x/"),
        ("", "/a/b", None, "/"),
    ];
    for (replacement, path, prefix, want) in cases {
        assert_eq!(
            rewrite_path(&full(replacement), path, prefix),
            want,
            "{replacement} {path}"
        );
    }
}

fn redirect(
    scheme: Option<&str>,
    hostname: Option<&str>,
    path: Option<PathModifier>,
    port: Option<u16>,
) -> RequestRedirect {
    RequestRedirect {
        scheme: scheme.map(str::to_string),
        hostname: hostname.map(str::to_string),
        path,
        port,
        status: 302,
    }
}

fn echo(path: &'static str, prefix: &'static str) -> RedirectRequest<'static> {
    RedirectRequest {
        scheme: "http",
        host: "echo",
        path,
        query: None,
        matched_prefix: Some(prefix),
        service_port: 80,
    }
}

#[test]
fn gamma_redirect_locations() {
    let prefix = |r: &str| Some(PathModifier::ReplacePrefixMatch(r.to_string()));
    let full = |r: &str| Some(PathModifier::ReplaceFullPath(r.to_string()));
    let org = Some("example.org");
    let https = Some("https");
    let cases = [
        // §3.5
        (
            "/hostname-redirect",
            redirect(None, org, None, None),
            "http://example.org/hostname-redirect",
        ),
        (
            "/host-and-status",
            redirect(None, org, None, None),
            "http://example.org/host-and-status",
        ),
        // §3.8
        (
            "/original-prefix/lemon",
            redirect(None, None, prefix("/replacement-prefix"), None),
            "http://echo/replacement-prefix/lemon",
        ),
        (
            "/full/path/original",
            redirect(None, None, full("/full-path-replacement"), None),
            "http://echo/full-path-replacement",
        ),
        (
            "/path-and-host",
            redirect(None, org, prefix("/replacement-prefix"), None),
            "http://example.org/replacement-prefix",
        ),
        (
            "/path-and-status",
            redirect(None, None, prefix("/replacement-prefix"), None),
            "http://echo/replacement-prefix",
        ),
        (
            "/full-path-and-host",
            redirect(None, org, full("/replacement-full"), None),
            "http://example.org/replacement-full",
        ),
        (
            "/full-path-and-status",
            redirect(None, None, full("/replacement-full"), None),
            "http://echo/replacement-full",
        ),
        // §3.9
        (
            "/port",
            redirect(None, None, None, Some(8083)),
            "http://echo:8083/port",
        ),
        (
            "/port-and-host",
            redirect(None, org, None, Some(8083)),
            "http://example.org:8083/port-and-host",
        ),
        (
            "/port-and-status",
            redirect(None, None, None, Some(8083)),
            "http://echo:8083/port-and-status",
        ),
        (
            "/port-and-host-and-status",
            redirect(None, org, None, Some(8083)),
            "http://example.org:8083/port-and-host-and-status",
        ),
        // §3.10
        (
            "/scheme",
            redirect(https, None, None, None),
            "https://echo/scheme",
        ),
        (
            "/scheme-and-host",
            redirect(https, org, None, None),
            "https://example.org/scheme-and-host",
        ),
        (
            "/scheme-and-status",
            redirect(https, None, None, None),
            "https://echo/scheme-and-status",
        ),
        (
            "/scheme-and-host-and-status",
            redirect(https, org, None, None),
            "https://example.org/scheme-and-host-and-status",
        ),
        // §3.11
        (
            "/redirect",
            redirect(None, None, None, None),
            "http://echo/redirect",
        ),
        (
            "/temporary",
            redirect(None, None, None, None),
            "http://echo/temporary",
        ),
        (
            "/permanent",
            redirect(None, None, None, None),
            "http://echo/permanent",
        ),
    ];
    for (path, r, want) in cases {
        // Every GAMMA redirect rule matches on the first path segment.
        let first_segment_end = path[1..].find('/').map_or(path.len(), |i| i + 1);
        let matched = &path[..first_segment_end];
        assert_eq!(redirect_location(&r, &echo(path, matched)), want, "{path}");
    }
}

#[test]
fn redirect_ports_hosts_and_queries() {
    let base = RedirectRequest {
        scheme: "http",
        host: "echo:8080",
        path: "/p",
        query: Some("a=1&b=%20"),
        matched_prefix: None,
        service_port: 8080,
    };
    let with = |host: &'static str, scheme: &'static str, port: u16| RedirectRequest {
        host,
        scheme,
        service_port: port,
        ..base
    };
    let cases = [
        (
            redirect(None, None, None, None),
            base,
            "http://echo:8080/p?a=1&b=%20",
        ),
        (
            redirect(None, Some("example.org"), None, None),
            base,
            "http://example.org:8080/p?a=1&b=%20",
        ),
        (
            redirect(Some("https"), None, None, None),
            base,
            "https://echo/p?a=1&b=%20",
        ),
        (
            redirect(Some("http"), None, None, None),
            base,
            "http://echo/p?a=1&b=%20",
        ),
        (
            redirect(Some("https"), None, None, Some(8443)),
            base,
            "https://echo:8443/p?a=1&b=%20",
        ),
        (
            redirect(Some("https"), None, None, Some(80)),
            base,
            "https://echo:80/p?a=1&b=%20",
        ),
        (
            redirect(None, None, None, Some(443)),
            with("h", "https", 80),
            "https://h/p?a=1&b=%20",
        ),
        (
            redirect(None, None, None, None),
            with("h:9", "https", 443),
            "https://h/p?a=1&b=%20",
        ),
        (
            redirect(None, None, None, None),
            with("h", "https", 80),
            "https://h:80/p?a=1&b=%20",
        ),
        (
            redirect(None, None, None, None),
            with("[fd00::1]:8080", "http", 80),
            "http://[fd00::1]/p?a=1&b=%20",
        ),
        (
            redirect(None, None, None, None),
            with("[fd00::1]", "http", 8080),
            "http://[fd00::1]:8080/p?a=1&b=%20",
        ),
        (
            redirect(None, None, None, None),
            with("fd00::1", "http", 80),
            "http://[fd00::1]/p?a=1&b=%20",
        ),
        (
            redirect(None, None, None, None),
            with("10.0.0.1:80", "http", 80),
            "http://10.0.0.1/p?a=1&b=%20",
        ),
        (
            redirect(None, None, None, None),
            RedirectRequest {
                query: Some(""),
                ..base
            },
            "http://echo:8080/p",
        ),
        (
            redirect(None, None, None, None),
            RedirectRequest {
                query: None,
                path: "",
                ..base
            },
            "http://echo:8080/",
        ),
    ];
    for (r, req, want) in cases {
        assert_eq!(redirect_location(&r, &req), want, "{r:?} {req:?}");
    }
}

#[test]
fn redirect_prefix_rewrite_keeps_the_query() {
    let r = redirect(
        None,
        None,
        Some(PathModifier::ReplacePrefixMatch("/new/".to_string())),
        None,
    );
    let req = RedirectRequest {
        query: Some("x=1"),
        ..echo("/old/a/b", "/old/")
    };
    assert_eq!(redirect_location(&r, &req), "http://echo/new/a/b?x=1");
}
