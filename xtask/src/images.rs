//! `cargo xtask images`: builds the container images of the operator and the shim with a local
//! Docker engine (or Podman), from `images/*.Dockerfile`.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

/// Each image: its name and its Dockerfile.
pub const IMAGES: &[(&str, &str)] = &[
    ("sluice-operator", "images/operator.Dockerfile"),
    ("sluice-shim", "images/shim.Dockerfile"),
];

/// The container engine to use: `$SLUICE_CONTAINER_ENGINE`, else `docker`, else `podman`; it must
/// answer `info`, i.e. have a running engine, not only a client.
fn engine() -> Result<String> {
    match std::env::var("SLUICE_CONTAINER_ENGINE") {
        Ok(e) if !e.is_empty() => engine_among(&[e.as_str()]),
        _ => engine_among(&["docker", "podman"]),
    }
}

fn engine_among(candidates: &[&str]) -> Result<String> {
    let mut found = Vec::new();
    for c in candidates {
        if !crate::deps::have(c) {
            continue;
        }
        let info = Command::new(c).arg("info").output();
        match info {
            Ok(o) if o.status.success() => return Ok((*c).to_owned()),
            Ok(o) => found.push(format!(
                "`{c} info` failed: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .rfind(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
            )),
            Err(e) => found.push(format!("`{c} info` did not start: {e}")),
        }
    }
    let why = if found.is_empty() {
        format!("none of {} is installed", candidates.join(", "))
    } else {
        found.join("; ")
    };
    bail!(
        "no container engine is running on this machine, so the images cannot be built here ({why}).\n\
         Build them where a Docker engine runs, from the repository root:\n  {}",
        IMAGES
            .iter()
            .map(|(name, file)| format!("docker build -f {file} -t {name}:<tag> ."))
            .collect::<Vec<_>>()
            .join("\n  ")
    )
}

/// Builds (and with `push`, pushes) both images as `[registry/]name:tag`.
pub fn build(root: &Path, registry: Option<&str>, tag: &str, push: bool) -> Result<()> {
    for (_, file) in IMAGES {
        if !root.join(file).is_file() {
            bail!("{file} is missing");
        }
    }
    let engine = engine()?;
    let mut built = Vec::new();
    for (name, file) in IMAGES {
        let reference = match registry {
            Some(r) => format!("{}/{name}:{tag}", r.trim_end_matches('/')),
            None => format!("{name}:{tag}"),
        };
        eprintln!("==> {engine} build -f {file} -t {reference} .");
        let status = Command::new(&engine)
            .args(["build", "-f", file, "-t", &reference, "."])
            .env("DOCKER_BUILDKIT", "1")
            .current_dir(root)
            .status()
            .with_context(|| format!("starting {engine}"))?;
        if !status.success() {
            bail!("building {reference} failed ({status})");
        }
        if push {
            let status = Command::new(&engine).args(["push", &reference]).status()?;
            if !status.success() {
                bail!("pushing {reference} failed ({status})");
            }
        }
        built.push(reference);
    }
    println!("built: {}", built.join(" "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stages(file: &str) -> Vec<String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        std::fs::read_to_string(root.join(file))
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn dockerfiles_are_multi_stage_and_the_operator_is_not_root() {
        for (_, file) in IMAGES {
            let from = stages(file);
            assert!(from.len() >= 2, "{file} is not multi-stage: {from:?}");
            assert!(from[0].contains(" AS build"), "{file}: {from:?}");
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let operator = std::fs::read_to_string(root.join(IMAGES[0].1)).unwrap();
        let last_user = operator.lines().rfind(|l| l.starts_with("USER ")).unwrap();
        assert_eq!(last_user, "USER 65532:65532");
        assert!(stages(IMAGES[0].1)[1].contains("distroless"));
    }

    #[test]
    fn a_missing_engine_is_said_plainly() {
        let candidates = ["sluice-no-such-engine"];
        assert!(!crate::deps::have(candidates[0]));
        let err = format!("{:#}", engine_among(&candidates).unwrap_err());
        assert!(err.contains("no container engine is running"), "{err}");
        assert!(err.contains("docker build -f images/shim.Dockerfile"), "{err}");
    }
}
