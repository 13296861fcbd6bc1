//! `iris-chat`: a small interactive chat over protocol v2, on `iris-client`.
//!
//! `iris-chat --server HOST:PORT --user NAME [--token JWT] [--tls | --ws | --wss]
//! [--ca FILE] [--server-name NAME] [--path /PATH]`, then lines on stdin: `/to USER`
//! picks the peer, a plain line is sent to it, `/status USER` asks whether a user is online,
//! `/typing` tells the peer you type, `/quit` leaves. Incoming messages print with sender and
//! time (UTC) and are marked read; your messages get `✓` once the server stored them and
//! `✓✓` when the peer read them.

use std::collections::HashMap;
use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use iris_client::{
    roots_from_pem, Client, ClientError, ClientOptions, Event, MsgKind, ReceiptKind, Transport,
};

#[derive(Parser, Debug)]
#[command(about = "Interactive chat over the Iris protocol v2")]
struct Args {
    /// The server's v2 address, HOST:PORT.
    #[arg(long)]
    server: String,
    /// Your user name.
    #[arg(long)]
    user: String,
    /// A JWT, when the server checks tokens.
    #[arg(long)]
    token: Option<String>,
    /// Connect over TLS (the server's v2 TLS port).
    #[arg(long, conflicts_with_all = ["ws", "wss"])]
    tls: bool,
    /// Connect over WebSocket (the server's v2 WebSocket port).
    #[arg(long, conflicts_with = "wss")]
    ws: bool,
    /// Connect over WebSocket over TLS (the server's v2 WSS port).
    #[arg(long)]
    wss: bool,
    /// PEM file of the certificates to trust for --tls/--wss: the server's self-signed
    /// certificate or the CA that signed it.
    #[arg(long, value_name = "FILE")]
    ca: Option<std::path::PathBuf>,
    /// The name the server's certificate is for. Default: the host part of --server.
    #[arg(long)]
    server_name: Option<String>,
    /// The WebSocket request path.
    #[arg(long, default_value = "/")]
    path: String,
}

/// The transport the flags ask for.
fn transport(args: &Args) -> anyhow::Result<Transport> {
    if !(args.tls || args.wss) {
        if args.ca.is_some() {
            bail!("--ca needs --tls or --wss");
        }
        return Ok(if args.ws {
            Transport::Ws {
                path: args.path.clone(),
            }
        } else {
            Transport::Tcp
        });
    }
    let Some(ca) = &args.ca else {
        bail!("--tls and --wss need --ca FILE (the certificates to trust, PEM)");
    };
    let pem = std::fs::read(ca).with_context(|| format!("read {}", ca.display()))?;
    let roots =
        roots_from_pem(&pem).with_context(|| format!("certificates of {}", ca.display()))?;
    let server_name = match &args.server_name {
        Some(n) => n.clone(),
        None => match args.server.rsplit_once(':') {
            Some((host, _)) => host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            None => args.server.clone(),
        },
    };
    Ok(if args.tls {
        Transport::Tls { server_name, roots }
    } else {
        Transport::Wss {
            server_name,
            roots,
            path: args.path.clone(),
        }
    })
}

/// `HH:MM:SS` (UTC) of a Unix millisecond time.
fn clock(unix_ms: u64) -> String {
    let s = unix_ms / 1000;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What the printer needs to know about our own messages.
#[derive(Default)]
struct Sent {
    /// client_msg_id → text, until SEND_ACK.
    pending: HashMap<u64, String>,
    /// server id → text, for receipts.
    stored: HashMap<u64, String>,
}

fn print_events(client: &Client, sent: &Mutex<Sent>) -> Result<(), ClientError> {
    loop {
        let Some(event) = client.recv(Duration::from_millis(500))? else {
            continue;
        };
        match event {
            Event::Deliver {
                server_id,
                sender,
                payload,
                server_time_unix_ms,
                ..
            } => {
                println!(
                    "[{}] {}: {}",
                    clock(server_time_unix_ms),
                    text(&sender),
                    text(&payload)
                );
                let _ = client.receipt(ReceiptKind::Read, &sender, &[server_id]);
            }
            Event::SendAck {
                client_msg_id,
                server_id,
                ..
            } => {
                let mut s = sent.lock().unwrap_or_else(|e| e.into_inner());
                let t = s.pending.remove(&client_msg_id).unwrap_or_default();
                println!("  ✓ {t}");
                s.stored.insert(server_id, t);
            }
            Event::Receipt {
                kind, reader, ids, ..
            } => {
                let s = sent.lock().unwrap_or_else(|e| e.into_inner());
                let what = match kind {
                    ReceiptKind::Read => "read",
                    ReceiptKind::Delivered => "delivered",
                };
                for id in ids {
                    let t = s.stored.get(&id).map(String::as_str).unwrap_or("?");
                    println!("  ✓✓ {t} ({what} by {})", text(&reader));
                }
            }
            Event::Typing { sender, typing } => {
                if typing {
                    println!("  {} is typing…", text(&sender));
                }
            }
            Event::Status {
                user,
                online,
                last_seen_unix_secs,
            } => match (online, last_seen_unix_secs) {
                (true, _) => println!("  {} is online", text(&user)),
                (false, 0) => println!("  {} was never seen", text(&user)),
                (false, t) => println!("  {} last seen {} UTC", text(&user), clock(t * 1000)),
            },
            Event::RateLimited { retry_after_ms, .. } => {
                println!("  (slow down: retrying in {retry_after_ms} ms)");
            }
            Event::Error { code, reason, .. } => println!("  (server error {code} {reason})"),
            Event::Reconnected => println!("  (reconnected)"),
            Event::Prekeys { .. } | Event::Pong { .. } => {}
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut opts = ClientOptions::new(&args.user);
    opts.transport = transport(&args)?;
    opts.jwt = args.token;
    opts.client_name = "iris-chat".into();
    let client = Arc::new(
        Client::connect(args.server.as_str(), opts)
            .with_context(|| format!("connecting to {}", args.server))?,
    );
    println!(
        "connected as {}; /to USER, /status USER, /typing, /quit",
        args.user
    );
    let sent = Arc::new(Mutex::new(Sent::default()));
    {
        let (client, sent) = (client.clone(), sent.clone());
        std::thread::spawn(move || match print_events(&client, &sent) {
            Ok(()) | Err(ClientError::Closed) => {}
            Err(e) => {
                eprintln!("connection lost: {e}");
                std::process::exit(1);
            }
        });
    }
    let mut peer: Option<String> = None;
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading stdin")?;
        let line = line.trim_end();
        if let Some(user) = line.strip_prefix("/to ") {
            peer = Some(user.trim().to_owned());
            println!("  talking to {}", user.trim());
        } else if let Some(user) = line.strip_prefix("/status ") {
            client.status(user.trim().as_bytes())?;
        } else if line == "/typing" {
            match &peer {
                Some(p) => client.typing(p.as_bytes(), true)?,
                None => println!("  /to USER first"),
            }
        } else if line == "/quit" {
            break;
        } else if line.starts_with('/') {
            println!("  commands: /to USER, /status USER, /typing, /quit");
        } else if !line.is_empty() {
            let Some(p) = &peer else {
                println!("  /to USER first");
                continue;
            };
            // Hold the lock over the send so the SEND_ACK finds the text.
            let mut s = sent.lock().unwrap_or_else(|e| e.into_inner());
            let id = client.send(p.as_bytes(), MsgKind::Plain, line.as_bytes())?;
            s.pending.insert(id, line.to_owned());
        }
    }
    // Give the last sends a moment to be stored.
    for _ in 0..40 {
        if client.unacked_sends() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = client.unacked_sends();
    client.close();
    if left > 0 {
        bail!("{left} messages were not stored by the server");
    }
    Ok(())
}
