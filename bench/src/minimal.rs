//! The reference: a minimal zbus service returning a stored bool, on its own bus name, in its
//! own process (the bench re-executes itself with `minimal-service`), with the same zbus
//! version and features as the daemon.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use anyhow::{Result, anyhow, bail};

/// Bus names of the two flavours (both may run at once).
pub const NAME: &str = "com.entrupy.BenchMinimal1";
pub const NAME_CURRENT: &str = "com.entrupy.BenchMinimalCurrent1";
pub const PATH: &str = "/com/entrupy/BenchMinimal1";
pub const IFACE: &str = "com.entrupy.BenchMinimal1";

struct Minimal {
    valid: Arc<AtomicBool>,
}

#[zbus::interface(name = "com.entrupy.BenchMinimal1")]
impl Minimal {
    fn is_valid(&self) -> bool {
        self.valid.load(Relaxed)
    }

    #[zbus(property)]
    fn valid(&self) -> bool {
        self.valid.load(Relaxed)
    }
}

/// Runtime flavour of the minimal service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Flavor {
    /// `#[tokio::main]`'s default: a multi-thread runtime (one worker per core).
    Multi,
    /// A current-thread runtime, as the daemon uses.
    Current,
}

impl Flavor {
    /// The bus name the service of this flavour owns.
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Multi => NAME,
            Flavor::Current => NAME_CURRENT,
        }
    }
}

/// The child's entry point: serve until killed; prints `READY` once the name is owned.
pub fn serve(address: &str, flavor: Flavor) -> Result<()> {
    let rt = match flavor {
        Flavor::Multi => tokio::runtime::Builder::new_multi_thread().enable_all().build()?,
        Flavor::Current => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
    };
    rt.block_on(async {
        let valid = Arc::new(AtomicBool::new(true));
        let _conn = zbus::connection::Builder::address(address)
            .name(flavor.name())
            .serve_at(PATH, Minimal { valid })
            .build()
            .await?;
        println!("READY");
        std::io::stdout().flush()?;
        std::future::pending::<()>().await;
        Ok(())
    })
}

/// The running child.
pub struct MinimalService {
    child: Child,
}

impl MinimalService {
    pub fn start(address: &str, flavor: Flavor) -> Result<MinimalService> {
        let exe = std::env::current_exe()?;
        let flavor = match flavor {
            Flavor::Multi => "multi",
            Flavor::Current => "current",
        };
        let mut child = Command::new(exe)
            .args(["minimal-service", "--address", address, "--flavor", flavor])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout of the minimal service"))?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        if line.trim() != "READY" {
            let _ = child.kill();
            bail!("the minimal service printed {line:?}");
        }
        Ok(MinimalService { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for MinimalService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
