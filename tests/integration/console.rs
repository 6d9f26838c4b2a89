//! The operator's console in a real browser: an aggregator and two nodes run a study, and
//! headless Chromium (Debian's `chromium`, which `scripts/test` installs when missing),
//! driven over the DevTools protocol from this test, opens the console. The test reads the
//! pages' text as a person sees it (`innerText`), follows the link to the study, checks the
//! keyboard (the first Tab reaches "Skip to content"), and saves screenshots. With
//! `MEDFED_UPDATE_SNAPSHOTS=1` they replace `docs/img/console-*.png`, which
//! docs/aggregator-operator.md shows.

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{Federation, Processes, SERVE_PIMA, pima_study, until};

/// A headless Chromium and one page of it, driven over the DevTools protocol.
struct Browser {
    child: Child,
    socket: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET from Chromium's DevTools HTTP server, which keeps the connection open: the body is
/// read by its Content-Length.
fn http_get(port: u16, path: &str) -> String {
    use std::io::Write;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).unwrap();
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= len || n == 0 {
                return body.to_string();
            }
        }
        assert!(n > 0, "the DevTools server closed the connection early");
    }
}

impl Browser {
    fn start(profile: &Path) -> Browser {
        let child = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1280,1000",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium is not installed: run scripts/test, which installs it (apt-get install chromium)");
        // Chromium writes the port it chose here.
        let active = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port: u16 = loop {
            if let Some(p) = std::fs::read_to_string(&active)
                .ok()
                .and_then(|t| t.lines().next()?.trim().parse().ok())
            {
                break p;
            }
            assert!(
                Instant::now() < deadline,
                "chromium did not open its DevTools port"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let targets: Value = serde_json::from_str(&http_get(port, "/json/list")).unwrap();
        let url = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_string();
        let (socket, _) = tungstenite::connect(url.as_str()).unwrap();
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = socket.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        }
        Browser {
            child,
            socket,
            next_id: 0,
        }
    }

    /// Sends a DevTools command and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket.send(tungstenite::Message::text(msg)).unwrap();
        loop {
            let reply = self.socket.read().unwrap();
            let Ok(text) = reply.to_text() else { continue };
            let v: Value = serde_json::from_str(text).unwrap_or_default();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn eval(&mut self, expression: &str) -> Value {
        self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        )["result"]["value"]
            .clone()
    }

    /// Opens `url` and waits until it has loaded.
    fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = self.eval("document.readyState + ' ' + location.href");
            if ready
                .as_str()
                .is_some_and(|s| s.starts_with("complete ") && s.ends_with(url))
            {
                break;
            }
            assert!(Instant::now() < deadline, "{url} did not load: {ready}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The page's text as a person sees it.
    fn text(&mut self) -> String {
        self.eval("document.body.innerText")
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// A PNG of the whole page.
    fn screenshot(&mut self) -> Vec<u8> {
        use base64::Engine as _;
        let r = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap()
    }

    fn press_tab(&mut self) {
        for kind in ["keyDown", "keyUp"] {
            self.call(
                "Input.dispatchKeyEvent",
                json!({"type": kind, "key": "Tab", "code": "Tab", "windowsVirtualKeyCode": 9}),
            );
        }
    }
}

/// Saves a screenshot next to the test's files, and into docs/img with
/// `MEDFED_UPDATE_SNAPSHOTS=1`.
fn save(png: &[u8], dir: &Path, name: &str) -> PathBuf {
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000,
        "{name}: not a real screenshot ({} bytes)",
        png.len()
    );
    let path = dir.join(name);
    std::fs::write(&path, png).unwrap();
    if std::env::var_os("MEDFED_UPDATE_SNAPSHOTS").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs/img")
            .join(name);
        std::fs::write(docs, png).unwrap();
    }
    path
}

#[test]
fn the_console_shows_sites_studies_and_curves_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fed = Federation::new(d)
        .sites(&["riverside", "st-marys"])
        .node_extra(|_| SERVE_PIMA.to_string())
        .out_dir(None)
        .ops()
        .aggregator(&format!(
            "{}[studies]\nkeep_serving = true\n",
            pima_study(
                "pima-diabetes",
                "rounds = 12\nmin_sites = 2\nwait_for_sites_secs = 60\n\
                 [study.training]\nlocal_epochs = 3\nlearning_rate = 0.05\n",
            )
        ))
        .write();
    let ops = fed.ops.clone().unwrap();
    let _procs = Processes({
        let mut p = fed.spawn_nodes();
        p.push(fed.spawn_aggregator());
        p
    });
    // The study completes; the aggregator keeps serving the console.
    eprintln!("waiting for the study");
    until("the study to complete", Duration::from_secs(120), || {
        fed.log("aggregator")
            .contains("study 'pima-diabetes' complete")
            || crate::ops::get(&ops, "/status").is_some_and(|r| r.contains("\"complete\""))
    });

    eprintln!("starting chromium");
    let mut browser = Browser::start(&d.join("chromium-profile"));
    eprintln!("chromium started");
    let base = format!("http://{ops}/");
    browser.open(&base);
    let text = browser.text();
    for seen in [
        "overview",
        "single aggregator",
        "Compliance log",
        "riverside",
        "st-marys",
        "connected",
        "pima-diabetes",
        "complete",
        "12 of 12",
        "Median answer time",
        "s ago",
    ] {
        assert!(
            text.contains(seen),
            "the overview does not show {seen:?}:\n{text}"
        );
    }
    let overview = save(&browser.screenshot(), d, "console-overview.png");
    // Keyboard: the first Tab reaches the skip link.
    browser.press_tab();
    let focused = browser.eval("document.activeElement.textContent");
    assert_eq!(focused, "Skip to content", "{text}");

    // The study's page, by its link, as a person would go there.
    let href = browser.eval("document.querySelector('a[href^=\"/studies/\"]').href");
    let href = href.as_str().unwrap().to_string();
    browser.open(&href);
    let text = browser.text();
    for seen in [
        "Study pima-diabetes",
        "Training curves",
        "Training loss per round",
        "Validation AUC per round",
        "Rounds",
        "Secure aggregation",
        "Privacy cost per site",
        "round-0012.json",
    ] {
        assert!(
            text.contains(seen),
            "the study page does not show {seen:?}:\n{text}"
        );
    }
    // The plotted last value is the table's.
    let last_auc = text
        .lines()
        .filter_map(|l| l.split("AUC ").nth(1))
        .next_back()
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    assert!(
        text.contains(&format!("(last {last_auc})"))
            || browser
                .eval("document.body.innerHTML")
                .as_str()
                .is_some_and(|h| h.contains(&format!("(last {last_auc})"))),
        "the chart's last AUC is not the table's {last_auc}"
    );
    // The charts say what they show to a screen reader too.
    let described = browser.eval(
        "[...document.querySelectorAll('svg[role=img] desc')].map(d => d.textContent).join('|')",
    );
    assert!(
        described.as_str().is_some_and(|s| s.contains("round 12")),
        "{described}"
    );
    let study = save(&browser.screenshot(), d, "console-study.png");
    eprintln!(
        "console screenshots: {} {}",
        overview.display(),
        study.display()
    );
}
