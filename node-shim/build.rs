//! Compiles the C datapath (`ebpf/*.bpf.c`) with clang into `OUT_DIR`, where `src/datapath.rs`
//! embeds it with `aya::include_bytes_aligned!`.
//!
//! NB: the object is rebuilt from source on every build that touches `ebpf/`, never committed,
//! so it cannot drift from the source. Debian's clang 14 or later is enough; the headers come
//! from `libbpf-dev` (`bpf/bpf_helpers.h`) and the kernel UAPI headers (`linux-libc-dev`).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const INSTALL_HINT: &str = "install it with `apt-get install clang llvm libbpf-dev` (Debian/Ubuntu) \
     or set SLUICE_CLANG to a clang that can target bpf";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let ebpf_dir = manifest_dir.join("../ebpf");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));

    println!("cargo:rerun-if-env-changed=SLUICE_CLANG");
    for file in ["sluice.bpf.c", "sluice.h"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(file).display());
    }

    let clang = env::var("SLUICE_CLANG").unwrap_or_else(|_| "clang".to_owned());
    let endian = env::var("CARGO_CFG_TARGET_ENDIAN").unwrap_or_else(|_| "little".to_owned());
    let target = if endian == "big" { "bpfeb" } else { "bpfel" };
    let arch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "arm64",
        Ok("x86_64") | Err(_) => "x86",
        Ok(other) => other,
    }
    .to_owned();

    compile(
        &clang,
        target,
        &arch,
        &ebpf_dir,
        &ebpf_dir.join("sluice.bpf.c"),
        &out_dir.join("sluice.bpf.o"),
    );
}

fn compile(clang: &str, target: &str, arch: &str, include: &Path, src: &Path, out: &Path) {
    let mut cmd = Command::new(clang);
    cmd.args(["-O2", "-g", "-Wall", "-Werror", "-target", target])
        .arg(format!("-D__TARGET_ARCH_{arch}"))
        .arg("-I")
        .arg(include);
    // The UAPI headers include <asm/types.h>, which Debian keeps under the multiarch directory.
    for multiarch in ["/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu"] {
        if Path::new(multiarch).join("asm/types.h").exists() {
            cmd.arg("-I").arg(multiarch);
            break;
        }
    }
    cmd.arg("-c").arg(src).arg("-o").arg(out);

    let output = match cmd.output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{clang}` was not found: the eBPF datapath is C compiled with clang; {INSTALL_HINT}")
        }
        Err(e) => panic!("could not run `{clang}`: {e}; {INSTALL_HINT}"),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint = if stderr.contains("bpf/bpf_helpers.h") || stderr.contains("asm/types.h") {
            format!("\nmissing headers: {INSTALL_HINT}")
        } else {
            String::new()
        };
        panic!("clang failed to compile {}:\n{stderr}{hint}", src.display());
    }
}
