use super::*;

fn r(first: u16, last: u16) -> PortRange {
    PortRange { first, last }
}

#[test]
fn port_lists() {
    let ok: &[(&str, &[PortRange], &str)] = &[
        ("", &[], ""),
        ("80", &[r(80, 80)], "80"),
        (" 80 , 443 ,", &[r(80, 80), r(443, 443)], "80,443"),
        (
            "8000 - 8100, 22",
            &[r(8000, 8100), r(22, 22)],
            "8000-8100,22",
        ),
        ("1-65535", &[r(1, 65535)], "1-65535"),
        ("7-7", &[r(7, 7)], "7"),
    ];
    for (input, want, rendered) in ok {
        let list = PortList::parse(input).unwrap();
        assert_eq!(list, PortList(want.to_vec()), "{input:?}");
        assert_eq!(list.to_string(), *rendered, "{input:?}");
    }
    let bad = [
        ("8o", "\"8o\" is not a port number"),
        ("80,http", "\"http\" is not a port number"),
        ("0", "port 0 is not a valid port"),
        ("65536", "port 65536 is out of range"),
        ("8100-8000", "starts after it ends (write it as 8000-8100)"),
        ("80-", "needs a port on both sides"),
        ("-80", "needs a port on both sides"),
        ("1-2-3", "\"2-3\" is not a port number"),
    ];
    for (input, want) in bad {
        let error = PortList::parse(input).unwrap_err();
        assert!(error.contains(want), "{input:?}: {error}");
    }
}

#[test]
fn normalized_port_lists_are_sorted_and_merged() {
    let cases = [
        ("", ""),
        ("9090,80,8080", "80,8080,9090"),
        ("8080,8080", "8080"),
        ("8000-8100,8080", "8000-8100"),
        ("9050-9200,9000-9100", "9000-9200"),
        // Adjacent but not overlapping: kept as written.
        ("8080,8081", "8080,8081"),
        ("1-65535,22", "1-65535"),
    ];
    for (input, want) in cases {
        let list = PortList::parse(input).unwrap().normalized();
        assert_eq!(list.to_string(), want, "{input:?}");
    }
}

#[test]
fn log_levels() {
    for ok in [
        "info",
        "DEBUG",
        " warn ",
        "off",
        "warn,trellis_proxy=debug",
        "trellis_proxy::outbound=trace",
        "info,[request]=debug",
    ] {
        assert_eq!(parse_log_level(ok).unwrap(), ok.trim(), "{ok:?}");
    }
    for (bad, want) in [
        ("", "empty value"),
        ("verbose", "\"verbose\" is not a log level"),
        ("info,warning", "\"warning\" is not a log level"),
        ("trellis_proxy=loud", "is not a valid log filter"),
    ] {
        let error = parse_log_level(bad).unwrap_err();
        assert!(error.contains(want), "{bad:?}: {error}");
    }
}

#[test]
fn quantities() {
    let cpu = [
        ("100m", 0.1),
        ("0.5", 0.5),
        ("1", 1.0),
        ("2k", 2000.0),
        ("1e-3", 0.001),
    ];
    for (text, value) in cpu {
        let q = Quantity::cpu(text).unwrap();
        assert!((q.value - value).abs() < 1e-12, "{text}: {}", q.value);
        assert_eq!(q.text, text);
    }
    let memory = [
        ("64Mi", 64.0 * 1024.0 * 1024.0),
        ("1Gi", 1024f64.powi(3)),
        ("500M", 5e8),
        ("1.1M", 1.1e6),
        ("1.5Ki", 1536.0),
        ("128974848", 128974848.0),
        ("129e6", 129e6),
        ("+1Mi", 1024.0 * 1024.0),
    ];
    for (text, value) in memory {
        let q = Quantity::memory(text).unwrap();
        assert!((q.value - value).abs() < 1e-3, "{text}: {}", q.value);
    }
    assert_eq!(Quantity::memory(" 64Mi ").unwrap().text, "64Mi");
}

#[test]
fn bad_quantities_say_why() {
    type Parse = fn(&str) -> Result<Quantity, String>;
    let cases: [(Parse, &str, &str); 12] = [
        (Quantity::cpu, "", "empty value"),
        (Quantity::cpu, "lots", "is not a Kubernetes quantity"),
        (Quantity::cpu, "100 m", "is not a Kubernetes quantity"),
        (Quantity::cpu, "1.2.3", "is not a Kubernetes quantity"),
        (Quantity::cpu, "100mi", "is not a Kubernetes quantity"),
        (Quantity::cpu, "1e", "is not a Kubernetes quantity"),
        (Quantity::cpu, "-1", "is negative"),
        (Quantity::cpu, "0", "is zero"),
        (Quantity::cpu, "100n", "below 1m"),
        (
            Quantity::memory,
            "128m",
            "not a whole number of bytes; did you mean 128Mi?",
        ),
        (Quantity::memory, "0.5", "not a whole number of bytes"),
        (Quantity::memory, "1e400", "too large"),
    ];
    for (parse, text, want) in cases {
        let error = parse(text).unwrap_err();
        assert!(error.contains(want), "{text:?}: {error}");
    }
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn parse_reads_every_trellis_annotation() {
    let overrides = parse(&map(&[
        (INJECT, "enabled"),
        (SKIP_INBOUND_PORTS, "22, 9000-9100"),
        (SKIP_OUTBOUND_PORTS, "5432"),
        (INBOUND_PLAINTEXT_PORTS, "8443,15000-15010"),
        (PROXY_LOG_LEVEL, "debug"),
        (PROXY_CPU_REQUEST, "250m"),
        (PROXY_MEMORY_REQUEST, "32Mi"),
        (PROXY_MEMORY_LIMIT, "128Mi"),
        ("unrelated.example/thing", "whatever"),
    ]))
    .unwrap();
    assert_eq!(overrides.inject, Some(InjectMode::Enabled));
    assert_eq!(
        overrides.skip_inbound_ports,
        Some(PortList(vec![r(22, 22), r(9000, 9100)]))
    );
    assert_eq!(
        overrides.skip_outbound_ports,
        Some(PortList(vec![r(5432, 5432)]))
    );
    assert_eq!(
        overrides.inbound_plaintext_ports,
        Some(PortList(vec![r(8443, 8443), r(15000, 15010)]))
    );
    assert_eq!(overrides.log_level.as_deref(), Some("debug"));
    assert_eq!(
        overrides.cpu_request.map(|q| q.text).as_deref(),
        Some("250m")
    );
    assert_eq!(
        overrides.memory_request.map(|q| q.text).as_deref(),
        Some("32Mi")
    );
    assert_eq!(
        overrides.memory_limit.map(|q| q.text).as_deref(),
        Some("128Mi")
    );
    assert_eq!(parse(&BTreeMap::new()).unwrap(), Overrides::default());
}

#[test]
fn access_log() {
    for (text, want) in [
        ("off", AccessLog::Off),
        ("json", AccessLog::Json),
        (" json ", AccessLog::Json),
    ] {
        assert_eq!(parse_access_log(text), Ok(want), "{text:?}");
    }
    for bad in ["", "JSON", "on", "text"] {
        assert!(parse_access_log(bad).is_err(), "{bad:?}");
    }
    let overrides = parse(&map(&[(ACCESS_LOG, "json")])).unwrap();
    assert_eq!(overrides.access_log, Some(AccessLog::Json));
    let error = parse(&map(&[(ACCESS_LOG, "yes")])).unwrap_err();
    assert_eq!(error.0[0].annotation, ACCESS_LOG);
}

#[test]
fn trace_sampling() {
    for (text, want) in [
        ("0", 0.0),
        ("1", 1.0),
        ("0.01", 0.01),
        (" .5 ", 0.5),
        ("1.0", 1.0),
        ("1e-05", 0.00001),
    ] {
        assert_eq!(parse_trace_sampling(text), Ok(want), "{text:?}");
    }
    for (bad, message) in [
        ("", "\"\" is not a share from 0 to 1 (examples: 0, 0.01, 1)"),
        (
            "5%",
            "\"5%\" is not a share from 0 to 1 (examples: 0, 0.01, 1)",
        ),
        (
            "-0.1",
            "\"-0.1\" is not a share from 0 to 1 (examples: 0, 0.01, 1)",
        ),
        (
            "inf",
            "\"inf\" is not a share from 0 to 1 (examples: 0, 0.01, 1)",
        ),
        (
            "NaN",
            "\"NaN\" is not a share from 0 to 1 (examples: 0, 0.01, 1)",
        ),
        (
            "0.1.2",
            "\"0.1.2\" is not a share from 0 to 1 (examples: 0, 0.01, 1)",
        ),
        (
            "5",
            "\"5\" is above 1; the share is from 0 to 1 (0.05 for 5 %)",
        ),
        (
            "1.01",
            "\"1.01\" is above 1; the share is from 0 to 1 (0.05 for 5 %)",
        ),
    ] {
        assert_eq!(
            parse_trace_sampling(bad),
            Err(message.to_string()),
            "{bad:?}"
        );
    }
    let overrides = parse(&map(&[(TRACE_SAMPLING, "0.25")])).unwrap();
    assert_eq!(overrides.trace_sampling, Some(0.25));
    let error = parse(&map(&[(TRACE_SAMPLING, "10%")])).unwrap_err();
    assert_eq!(error.0[0].annotation, TRACE_SAMPLING);
}

#[test]
fn parse_reports_every_bad_annotation_at_once() {
    let error = parse(&map(&[
        (INJECT, "false"),
        (SKIP_OUTBOUND_PORTS, "http"),
        (PROXY_MEMORY_LIMIT, "lots"),
    ]))
    .unwrap_err();
    let names: Vec<_> = error.0.iter().map(|i| i.annotation).collect();
    assert_eq!(names, [INJECT, SKIP_OUTBOUND_PORTS, PROXY_MEMORY_LIMIT]);
    assert_eq!(
        error.to_string(),
        "annotation trellis.dev/inject: \"false\" is not a valid value (use enabled or \
         disabled); annotation trellis.dev/skip-outbound-ports: \"http\" is not a port number; \
         annotation trellis.dev/proxy-memory-limit: \"lots\" is not a Kubernetes quantity \
         (examples: 100m, 0.5, 64Mi, 1Gi, 500M)"
    );
}
