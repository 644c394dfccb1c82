//! The nginx gateway: renders gateway/nginx.conf.template and runs nginx under our supervision.
//!
//! In the library (not only the launcher) so that integration tests can put the real gateway in
//! front of a fleet they build themselves.
//!
//! nginx runs with `-p <prefix> -c <conf> -e <error log>` and every path in the config pointing
//! into target/fleet, so it needs no root and never touches /etc/nginx or /var/log/nginx.
//! `daemon off` keeps the master as our direct child (a pid we know, in its own process group
//! with its workers, so `down` can stop them together).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::net::port_is_open;
use crate::proc::{self, spawn_logged, tail};
use crate::{find_binary, wait_http_ok};

pub const TEMPLATE: &str = "gateway/nginx.conf.template";

/// Values for the template's placeholders, plus what goes on nginx's command line.
#[derive(Debug, Clone)]
pub struct Params {
    pub bind_host: String,
    pub port: u16,
    pub prefix: PathBuf,
    pub log_dir: PathBuf,
    /// Passed as `-g 'user root;'`: as root without it, workers would run as `nobody` and
    /// might not reach temp files under a private checkout.
    pub run_as_root: bool,
    /// Passed as `-g 'worker_rlimit_nofile N;'`: the limit xtask could raise itself to.
    pub nofile: u64,
    /// (service, instance ports): fills `<SERVICE>_<n>_PORT`, n from 1.
    pub upstreams: Vec<(String, Vec<u16>)>,
}

impl Params {
    /// Placeholder name → value.
    fn values(&self) -> Vec<(String, String)> {
        let mut v = vec![
            ("PREFIX".to_string(), self.prefix.display().to_string()),
            ("LOG_DIR".to_string(), self.log_dir.display().to_string()),
            ("BIND_HOST".to_string(), self.bind_host.clone()),
            ("GATEWAY_PORT".to_string(), self.port.to_string()),
        ];
        for (service, ports) in &self.upstreams {
            for (i, port) in ports.iter().enumerate() {
                v.push((
                    format!("{}_{}_PORT", service.to_uppercase(), i + 1),
                    port.to_string(),
                ));
            }
        }
        v
    }

    /// The `-g` directives.
    fn globals(&self) -> String {
        let mut g = format!("daemon off; worker_rlimit_nofile {};", self.nofile);
        if self.run_as_root {
            g.push_str(" user root;");
        }
        g
    }
}

/// Fills in the template. Fails on a value the template has no place for (an instance the
/// template does not route to) and on a placeholder left unfilled, so the template and the
/// fleet cannot drift apart unnoticed.
pub fn render(template: &str, p: &Params) -> Result<String> {
    let mut out = template.to_string();
    for (name, value) in p.values() {
        let key = format!("{{{{{name}}}}}");
        if !out.contains(&key) {
            bail!("{TEMPLATE} has no {key} placeholder");
        }
        out = out.replace(&key, &value);
    }
    if let Some(i) = out.find("{{") {
        let rest = &out[i..];
        let end = rest.find("}}").map(|e| e + 2).unwrap_or(rest.len().min(40));
        bail!("unfilled placeholder {} in {TEMPLATE}", &rest[..end]);
    }
    Ok(out)
}

/// The nginx command line for a rendered config.
fn nginx_command(nginx: &Path, conf: &Path, error_log: &Path, p: &Params) -> Command {
    let mut cmd = proc::command(nginx);
    // Working directory inside the fleet: `down` recognises orphaned workers by it.
    cmd.current_dir(&p.prefix)
        .arg("-p")
        .arg(&p.prefix)
        .arg("-c")
        .arg(conf)
        .arg("-e")
        .arg(error_log)
        .arg("-g")
        .arg(p.globals());
    cmd
}

/// A started gateway.
pub struct Started {
    pub pid: u32,
    pub log: PathBuf,
}

/// Renders the config into `<fleet>/nginx/nginx.conf`, checks it with `nginx -t`, starts nginx
/// and waits until it accepts connections.
pub fn start(root: &Path, fleet_dir: &Path, params: &Params) -> Result<Started> {
    let nginx = find_binary("nginx").ok_or_else(|| anyhow!("nginx not found"))?;
    let template_path = root.join(TEMPLATE);
    let template = std::fs::read_to_string(&template_path)
        .with_context(|| format!("cannot read {}", template_path.display()))?;
    let prefix = &params.prefix;
    for tmp in [
        "client_body_temp",
        "proxy_temp",
        "fastcgi_temp",
        "uwsgi_temp",
        "scgi_temp",
    ] {
        std::fs::create_dir_all(prefix.join(tmp))?;
    }
    std::fs::create_dir_all(&params.log_dir)?;
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, render(&template, params)?)?;
    let error_log = params.log_dir.join("nginx-error.log");
    let stdout_log = fleet_dir.join("logs").join("nginx.log");

    let mut check = nginx_command(&nginx, &conf, &error_log, params);
    check.arg("-t");
    let (ok, output) = proc::run_with_timeout(&mut check, Duration::from_secs(20))?;
    if !ok {
        bail!("nginx -t rejected {}:\n{}", conf.display(), output.trim());
    }

    let mut child = spawn_logged(
        &mut nginx_command(&nginx, &conf, &error_log, params),
        &stdout_log,
    )?;
    let pid = child.id();
    let port = params.port;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !port_is_open(port) {
        if let Some(status) = child.try_wait()? {
            bail!(
                "nginx exited at start ({status}):\n{}\n{}",
                tail(&stdout_log, 10),
                tail(&error_log, 10)
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            bail!("nginx did not open port {port}:\n{}", tail(&error_log, 10));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Started {
        pid,
        log: stdout_log,
    })
}

/// Checks that requests for each service make it through the gateway (its `/health`).
pub fn check_routes(gateway_url: &str) -> Result<()> {
    for prefix in ["stock", "payment", "orders"] {
        wait_http_ok(
            &format!("{gateway_url}/{prefix}/health"),
            Duration::from_secs(15),
        )
        .with_context(|| format!("/{prefix}/ is not routed through the gateway"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(prefix: &Path) -> Params {
        Params {
            bind_host: "127.0.0.1".into(),
            port: 8000,
            prefix: prefix.to_path_buf(),
            log_dir: prefix.join("logs"),
            run_as_root: false,
            nofile: 20000,
            upstreams: vec![
                ("stock".into(), vec![8101, 8102]),
                ("payment".into(), vec![8201, 8202]),
                ("order".into(), vec![8301, 8302]),
            ],
        }
    }

    fn template() -> String {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(TEMPLATE),
        )
        .unwrap()
    }

    #[test]
    fn template_renders_completely() {
        let conf = render(&template(), &params(Path::new("/f/nginx"))).unwrap();
        assert!(!conf.contains("{{"));
        assert!(conf.contains("server 127.0.0.1:8102 max_fails=0;"));
        assert!(conf.contains("server 127.0.0.1:8201 max_fails=0;"));
        assert!(conf.contains("server 127.0.0.1:8301"));
        assert!(conf.contains("listen 127.0.0.1:8000 backlog=4096;"));
        assert!(conf.contains("pid /f/nginx/nginx.pid;"));
        assert!(conf.contains("proxy_pass http://stock/;"));
        assert!(conf.contains("proxy_next_upstream error timeout non_idempotent;"));
        // `user` is given on the command line when needed, never in the file.
        assert!(!conf.lines().any(|l| l.trim_start().starts_with("user ")));
    }

    #[test]
    fn globals_go_on_the_command_line() {
        let mut p = params(Path::new("/f"));
        assert_eq!(p.globals(), "daemon off; worker_rlimit_nofile 20000;");
        p.run_as_root = true;
        assert!(p.globals().ends_with(" user root;"));
    }

    #[test]
    fn missing_values_are_reported() {
        let mut p = params(Path::new("/f"));
        p.upstreams.pop();
        let err = render(&template(), &p).unwrap_err().to_string();
        assert!(err.contains("ORDER_1_PORT"), "{err}");
        let mut p = params(Path::new("/f"));
        p.upstreams[0].1.push(8103);
        let err = render(&template(), &p).unwrap_err().to_string();
        assert!(err.contains("STOCK_3_PORT"), "{err}");
    }

    /// The rendered config passes `nginx -t`, and routes strip the first path segment: a
    /// throwaway upstream on a free port echoes the path it was asked for. Needs nginx: without
    /// it the test fails rather than skips (CI installs it).
    #[test]
    fn rendered_config_is_valid_and_strips_the_prefix() {
        assert!(
            find_binary("nginx").is_some(),
            "nginx is not installed: install it (apt-get install nginx) to run this test; \
             it does not skip"
        );
        use std::io::{BufRead, BufReader, Write};
        let dir = crate::ScratchDir::new("gateway").unwrap();
        // A tiny upstream that answers every request with the request line's path.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let up_port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { return };
                let mut reader = BufReader::new(s.try_clone().unwrap());
                let mut first = String::new();
                reader.read_line(&mut first).unwrap();
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
                    line.clear();
                }
                let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{path}",
                    path.len()
                );
            }
        });
        let gw_port = crate::free_port();
        let mut p = params(&dir.join("nginx"));
        p.port = gw_port;
        p.run_as_root = proc::is_root();
        // The first server of each upstream is dead (port 1): exercises the retry.
        p.upstreams = ["stock", "payment", "order"]
            .iter()
            .map(|n| (n.to_string(), vec![1, up_port]))
            .collect();
        let started = start(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("..").as_path(),
            dir.path(),
            &p,
        )
        .unwrap();
        let base = format!("http://127.0.0.1:{gw_port}");
        let get = |path: &str| crate::http_get(&format!("{base}{path}"), Duration::from_secs(5));
        let result = (|| -> Result<()> {
            assert_eq!(get("/stock/find/7")?.body, "/find/7");
            assert_eq!(get("/orders/checkout/abc")?.body, "/checkout/abc");
            assert_eq!(get("/payment/find_user/1")?.body, "/find_user/1");
            let other = get("/nope")?;
            assert_eq!(other.status, 404);
            assert!(other.body.contains("\"error\""));
            Ok(())
        })();
        proc::terminate(started.pid, None, Duration::from_secs(5)).unwrap();
        result.unwrap();
    }
}
