//! `medfed audit console`: the auditor's view of one party's compliance log in a browser.
//! Every page verifies the log again (records, hash chain, signed tree heads) with the
//! party's public key before it shows anything: the facts of `audit report`, per study, and
//! per round what left the party, what it received, what it released and what it spent of
//! its privacy budget. A log that fails verification shows only where it fails.
//!
//! Read-only, on loopback only: it serves the auditor's own machine.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use medfed_aggregator::console::{esc, page_with_nav, percent, when};
use medfed_protocol::audit::{Event, Verified};

/// `medfed audit console`.
#[derive(clap::Args)]
pub struct ConsoleArgs {
    /// The party's compliance log.
    #[arg(long)]
    log: PathBuf,
    /// The party's public key (file or 64 hex digits).
    #[arg(long)]
    key: String,
    /// Where to serve the pages (a loopback address).
    #[arg(long, default_value = "127.0.0.1:8470")]
    listen: std::net::SocketAddr,
}

struct Auditor {
    log: PathBuf,
    key: String,
}

const NAV: &str = "<a href=\"/\">Summary</a>";

/// Serves the auditor's console until interrupted.
pub fn console(args: ConsoleArgs) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() {
        bail!(
            "--listen {} is not a loopback address: the auditor's console shows a party's log \
             to whoever can reach it, so it serves this machine only (use 127.0.0.1)",
            args.listen
        );
    }
    // Refuse to start on a log that does not verify.
    let v = crate::audit::load(&args.log, &args.key)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        println!(
            "compliance log of '{}' ({} records) verified; open http://{}/ (Ctrl-C stops)",
            v.party,
            v.records.len(),
            listener.local_addr()?
        );
        let state = Arc::new(Auditor {
            log: args.log,
            key: args.key,
        });
        let app = axum::Router::new()
            .route("/", axum::routing::get(summary))
            .route("/studies/{id}", axum::routing::get(study))
            .with_state(state);
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                // Without a Ctrl-C handler the console serves until killed, rather than
                // stop at once.
                if let Err(e) = tokio::signal::ctrl_c().await {
                    eprintln!("cannot listen for Ctrl-C ({e}); stop the console with kill");
                    std::future::pending::<()>().await;
                }
            })
            .await?;
        Ok(())
    })
}

impl Auditor {
    /// The log, verified now.
    fn verified(&self) -> Result<Verified, Box<Response>> {
        crate::audit::load(&self.log, &self.key).map_err(|e| {
            Box::new((
                StatusCode::INTERNAL_SERVER_ERROR,
                Html(page_with_nav(
                    "Verification FAILED",
                    NAV,
                    &format!(
                        "<p class=\"bad\">The compliance log does not verify with the key given; \
                         nothing in it can be trusted:</p><p><code>{}</code></p>",
                        esc(&format!("{e:#}"))
                    ),
                )),
            )
                .into_response())
        })
    }
}

fn kb(n: u64) -> String {
    if n >= 10_000 {
        format!("{:.1} kB", n as f64 / 1e3)
    } else {
        format!("{n} B")
    }
}

async fn summary(State(a): State<Arc<Auditor>>) -> Response {
    let v = match a.verified() {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let r = crate::audit::summarise(&v);
    let mut b = format!(
        "<p class=\"ok\">Verified: {} records, hash chain and signed tree heads intact (key {}).</p>",
        r.records,
        esc(&a.key.chars().take(80).collect::<String>())
    );
    if r.unsigned_tail > 0 {
        b.push_str(&format!(
            "<p class=\"bad\">The last {} records are not covered by a signed tree head yet.</p>",
            r.unsigned_tail
        ));
    }
    for (dataset, releases) in &r.exact_allowed {
        b.push_str(&format!(
            "<p class=\"bad\">Dataset '{}' may be released WITHOUT differential privacy: {}.</p>",
            esc(dataset),
            esc(&releases.join(", "))
        ));
    }
    b.push_str(&format!(
        "<table><caption>The party</caption><tbody>\
         <tr><th scope=\"row\">Party</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Starts</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Recoveries after a crash</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Errors</th><td>{}</td></tr></tbody></table>",
        esc(&r.party),
        r.starts,
        r.recoveries,
        if r.errors.is_empty() {
            "none".to_string()
        } else {
            r.errors
                .iter()
                .map(|e| esc(e))
                .collect::<Vec<_>>()
                .join("<br>")
        }
    ));
    b.push_str(
        "<h2>Studies</h2><table><caption>What left the party and what was asked of it, per study</caption>\
         <thead><tr><th scope=\"col\">Study</th><th scope=\"col\">Rounds</th>\
         <th scope=\"col\">Messages out</th><th scope=\"col\">Bytes out</th>\
         <th scope=\"col\">Messages in</th><th scope=\"col\">Bytes in</th>\
         <th scope=\"col\">Released</th><th scope=\"col\">Exact releases</th>\
         <th scope=\"col\">Decisions</th></tr></thead><tbody>",
    );
    for (study, s) in &r.studies {
        b.push_str(&format!(
            "<tr><th scope=\"row\"><a href=\"/studies/{}\">{}</a></th><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            esc(&percent(study)),
            esc(study),
            s.rounds.len(),
            s.messages_sent,
            kb(s.bytes_sent),
            s.messages_received,
            kb(s.bytes_received),
            s.released,
            s.exact_releases,
            crate::audit::compact(&s.decisions)
                .iter()
                .map(|d| esc(d))
                .collect::<Vec<_>>()
                .join("<br>")
        ));
    }
    b.push_str("</tbody></table>");
    Html(page_with_nav(
        &format!("Compliance log of {}", r.party),
        NAV,
        &b,
    ))
    .into_response()
}

/// One round of one study, as the log records it.
#[derive(Default)]
struct Round {
    sent: (u64, u64),
    received: (u64, u64),
    kinds_sent: BTreeSet<String>,
    peers: BTreeSet<String>,
    released: Vec<String>,
    privacy: Vec<String>,
    first_ms: Option<u64>,
}

async fn study(State(a): State<Arc<Auditor>>, UrlPath(id): UrlPath<String>) -> Response {
    let v = match a.verified() {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let mut rounds: BTreeMap<u32, Round> = BTreeMap::new();
    for rec in &v.records {
        let round = match &rec.event {
            Event::Sent(m) | Event::Received(m) if m.study.as_deref() == Some(id.as_str()) => {
                let r = rounds.entry(m.round.unwrap_or(0)).or_default();
                r.peers.insert(m.peer.clone());
                if matches!(rec.event, Event::Sent(_)) {
                    r.sent.0 += 1;
                    r.sent.1 += m.bytes;
                    r.kinds_sent.insert(m.message.clone());
                } else {
                    r.received.0 += 1;
                    r.received.1 += m.bytes;
                }
                m.round.unwrap_or(0)
            }
            Event::Released {
                study,
                round,
                sites,
                sha256,
            } if *study == id => {
                rounds.entry(*round).or_default().released.push(format!(
                    "released over {} (sha256 {}…)",
                    sites.join(", "),
                    &sha256[..sha256.len().min(12)]
                ));
                *round
            }
            Event::PrivacySpent {
                study,
                round,
                epsilon,
                total_epsilon,
                delta,
                refused,
            } if *study == id => {
                rounds
                    .entry(*round)
                    .or_default()
                    .privacy
                    .push(crate::audit::privacy_spent(
                        *epsilon,
                        *total_epsilon,
                        *delta,
                        *refused,
                    ));
                *round
            }
            _ => continue,
        };
        let entry = rounds.entry(round).or_default();
        entry.first_ms.get_or_insert(rec.time_ms);
    }
    if rounds.is_empty() {
        return (
            StatusCode::NOT_FOUND,
            Html(page_with_nav(
                "No such study",
                NAV,
                &format!("<p>The log records nothing of study '{}'.</p>", esc(&id)),
            )),
        )
            .into_response();
    }
    let mut b = format!(
        "<p class=\"ok\">Verified log of '{}'. Round 0 holds what belongs to no round (the \
         announcement, the decision, statistics queries).</p>\
         <table><caption>Study {} per round</caption><thead><tr><th scope=\"col\">Round</th>\
         <th scope=\"col\">First record</th><th scope=\"col\">Sent (messages, bytes)</th>\
         <th scope=\"col\">Kinds sent</th><th scope=\"col\">Received (messages, bytes)</th>\
         <th scope=\"col\">Peers</th><th scope=\"col\">Released</th><th scope=\"col\">Privacy spent</th>\
         </tr></thead><tbody>",
        esc(&v.party),
        esc(&id)
    );
    for (round, r) in &rounds {
        b.push_str(&format!(
            "<tr><th scope=\"row\">{round}</th><td>{}</td><td class=\"n\">{}, {}</td><td>{}</td>\
             <td class=\"n\">{}, {}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            r.first_ms.map(when).unwrap_or_default(),
            r.sent.0,
            kb(r.sent.1),
            esc(&r.kinds_sent.iter().cloned().collect::<Vec<_>>().join(", ")),
            r.received.0,
            kb(r.received.1),
            esc(&r.peers.iter().cloned().collect::<Vec<_>>().join(", ")),
            esc(&r.released.join("; ")),
            esc(&r.privacy.join("; "))
        ));
    }
    b.push_str("</tbody></table>");
    Html(page_with_nav(&format!("Study {id}"), NAV, &b)).into_response()
}
