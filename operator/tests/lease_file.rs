//! `--lease-file` with real `sluice-operator run` processes (`dir:` source): the holder of the
//! file's lock is the only one ready and serving; a SIGTERMed leader exits 0 after releasing it,
//! a SIGKILLed one loses it with its life, and either way a standby leads, on the same gRPC
//! address, within 2 s.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use nix::{sys::signal, unistd::Pid};

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Operator {
    name: &'static str,
    child: Child,
    metrics: SocketAddr,
    log: PathBuf,
}

impl Operator {
    fn start(name: &'static str, scratch: &Path, grpc: SocketAddr) -> Operator {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = scratch.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sluice-operator"))
            .arg("run")
            .arg(format!("--source=dir:{}", scratch.join("manifests").display()))
            .arg("--lease-file")
            .arg(scratch.join("lease"))
            .arg(format!("--grpc-listen={grpc}"))
            .arg(format!("--metrics-listen={metrics}"))
            .arg("--insecure-allow-any-node")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Operator {
            name,
            child,
            metrics,
            log,
        }
    }

    /// `/readyz`'s status code; `None` while nothing answers.
    fn ready(&self) -> Option<u16> {
        let mut stream = TcpStream::connect_timeout(&self.metrics, Duration::from_millis(200)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response.split_whitespace().nth(1)?.parse().ok()
    }

    /// Waits until `/readyz` answers `code`; how long that took.
    fn wait_ready(&self, code: u16, timeout: Duration) -> Duration {
        let started = Instant::now();
        while self.ready() != Some(code) {
            assert!(
                started.elapsed() < timeout,
                "{} never answered {code} on /readyz (last {:?})\n{}",
                self.name,
                self.ready(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        started.elapsed()
    }

    fn signal(&self, sig: signal::Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        signal::kill(pid, sig).unwrap();
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < timeout,
                "{} did not exit within {timeout:?}\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log(&self) -> String {
        format!(
            "--- {}\n{}",
            self.name,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serving(grpc: SocketAddr) -> bool {
    TcpStream::connect_timeout(&grpc, Duration::from_millis(200)).is_ok()
}

#[test]
fn the_lease_file_holder_alone_serves_and_a_standby_takes_over_within_2_s() {
    let scratch = tempfile::tempdir().unwrap();
    std::fs::create_dir(scratch.path().join("manifests")).unwrap();
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();

    let mut a = Operator::start("a", scratch.path(), grpc);
    a.wait_ready(200, Duration::from_secs(20));
    assert!(serving(grpc), "the leader does not serve\n{}", a.log());
    let pid = std::fs::read_to_string(scratch.path().join("lease")).unwrap();
    assert_eq!(
        pid.trim(),
        a.child.id().to_string(),
        "the lease file names its holder"
    );
    let b = Operator::start("b", scratch.path(), grpc);
    b.wait_ready(503, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!((a.ready(), b.ready()), (Some(200), Some(503)));

    // SIGTERM: the leader closes the node channel, releases the lock and exits 0; the standby
    // binds the same address.
    let signalled = Instant::now();
    a.signal(signal::Signal::SIGTERM);
    b.wait_ready(200, Duration::from_secs(5));
    let took = signalled.elapsed();
    let status = a.wait_exit(Duration::from_secs(5));
    assert!(
        status.success(),
        "a graceful stop exits 0, not {status}\n{}",
        a.log()
    );
    assert!(
        took < Duration::from_secs(2),
        "graceful handover took {took:?}\n{}{}",
        a.log(),
        b.log()
    );
    assert!(serving(grpc), "the new leader does not serve\n{}", b.log());
    println!("GRACEFUL (lease file): the standby leads {took:?} after SIGTERM");

    // SIGKILL: the kernel releases the lock as the leader dies.
    let c = Operator::start("c", scratch.path(), grpc);
    c.wait_ready(503, Duration::from_secs(20));
    let killed = Instant::now();
    b.signal(signal::Signal::SIGKILL);
    c.wait_ready(200, Duration::from_secs(5));
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "takeover after SIGKILL took {took:?}\n{}",
        c.log()
    );
    assert!(serving(grpc), "the new leader does not serve\n{}", c.log());
    println!("KILLED (lease file): the standby leads {took:?} after SIGKILL");

    // A standby stopped with SIGINT just goes; the leader keeps the lock.
    let mut d = Operator::start("d", scratch.path(), grpc);
    d.wait_ready(503, Duration::from_secs(20));
    d.signal(signal::Signal::SIGINT);
    let status = d.wait_exit(Duration::from_secs(2));
    assert!(status.success(), "{status}\n{}", d.log());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.ready(), Some(200));
}
