//! A real PostgreSQL server for a test: a cluster made by `initdb` in a temporary
//! directory, listening on a free loopback port, stopped when the value is dropped.
//! `scripts/test` installs Debian's `postgresql` when it is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running PostgreSQL cluster (superuser `postgres`, trust authentication on loopback).
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    /// Its Unix socket directory.
    pub socket_dir: PathBuf,
    as_postgres: bool,
    _dir: tempfile::TempDir,
}

/// The directory of PostgreSQL's server programs: where `initdb` is on the PATH, else
/// Debian's `/usr/lib/postgresql/<version>/bin` (the newest).
fn bin_dir() -> PathBuf {
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        && out.status.success()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let p = std::fs::canonicalize(&p).unwrap_or(p);
        return p.parent().unwrap().to_path_buf();
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: scripts/test installs Debian's postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no initdb under /usr/lib/postgresql: scripts/test installs Debian's postgresql")
}

impl Postgres {
    /// Makes a cluster and starts its server (with `extra` lines appended to its
    /// postgresql.conf, e.g. TLS settings).
    pub fn start_with(extra: &str, files: &[(&str, &[u8])]) -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        let bin = bin_dir();
        // initdb refuses to run as root: the cluster then belongs to the `postgres` user.
        let as_postgres = is_root();
        let data = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&socket_dir).unwrap();
        if as_postgres {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let uid = postgres_uid();
            for d in [&data, &socket_dir] {
                std::os::unix::fs::chown(d, Some(uid), None).unwrap();
            }
        }
        let run = |program: &str, args: &[&str]| {
            let program = bin.join(program);
            let mut c = if as_postgres {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(&program);
                c
            } else {
                Command::new(&program)
            };
            let out = c.args(args).output().unwrap();
            assert!(
                out.status.success(),
                "{} {args:?}: {}{}",
                program.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let data_s = data.to_str().unwrap();
        run(
            "initdb",
            &[
                "-D",
                data_s,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        for (name, bytes) in files {
            let path = data.join(name);
            std::fs::write(&path, bytes).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            if as_postgres {
                std::os::unix::fs::chown(&path, Some(postgres_uid()), None).unwrap();
            }
        }
        let port = super::free_tcp_port();
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        use std::io::Write;
        writeln!(
            conf,
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nfsync = off\n{extra}",
            socket_dir.display()
        )
        .unwrap();
        let log = dir.path().join("server.log");
        if as_postgres {
            std::fs::write(&log, "").unwrap();
            std::os::unix::fs::chown(&log, Some(postgres_uid()), None).unwrap();
        }
        run(
            "pg_ctl",
            &[
                "-D",
                data_s,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        Postgres {
            bin,
            data,
            port,
            socket_dir,
            as_postgres,
            _dir: dir,
        }
    }

    /// A plain cluster.
    pub fn start() -> Postgres {
        Postgres::start_with("", &[])
    }

    /// A connection string for `dbname` over loopback TCP.
    pub fn connect(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port
        )
    }

    /// Creates database `name` and runs the SQL file `sql` in it.
    pub fn load(&self, name: &str, sql: &Path) {
        let sql = std::fs::read_to_string(sql).unwrap();
        self.execute("postgres", &format!("CREATE DATABASE {name}"));
        self.execute(name, &sql);
    }

    /// Runs `sql` (one or more statements) in database `db`.
    pub fn execute(&self, db: &str, sql: &str) {
        self.query(db, sql);
    }

    /// The rows of a query (or the last of several statements) in `db`, each as its
    /// columns' text.
    pub fn query(&self, db: &str, sql: &str) -> Vec<Vec<Option<String>>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&self.connect(db), tokio_postgres::NoTls)
                .await
                .unwrap();
            let conn = tokio::spawn(conn);
            let mut out = Vec::new();
            for m in client.simple_query(sql).await.unwrap() {
                if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                    out.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
                }
            }
            drop(client);
            let _ = conn.await;
            out
        })
    }
}

impl Postgres {
    /// `pg_ctl` on this cluster, as its owner.
    fn pg_ctl(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        let pg_ctl = self.bin.join("pg_ctl");
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&pg_ctl);
            c
        } else {
            Command::new(&pg_ctl)
        };
        c.args(["-D", self.data.to_str().unwrap()])
            .args(args)
            .output()
    }

    /// Stops the server at once (as a crash would), then starts it again.
    pub fn restart(&self) {
        // With its log file: the server must not hold this process's output pipe open.
        let log = self.data.parent().unwrap().join("server.log");
        let out = self
            .pg_ctl(&[
                "-m",
                "immediate",
                "-w",
                "-l",
                log.to_str().unwrap(),
                "restart",
            ])
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl restart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn postgres_uid() -> u32 {
    let out = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "running as root, the test cluster belongs to the user `postgres`, which does not exist (Debian's postgresql package makes it)"
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}
