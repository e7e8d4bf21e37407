//! Compiles the C datapath (`ebpf/*.bpf.c`) with clang into `OUT_DIR`, where `src/datapath.rs`
//! embeds it with `aya::include_bytes_aligned!`, and writes the header's constants as Rust
//! (`OUT_DIR/sluice_h.rs`, included by `src/maps.rs`).
//!
//! NB: the object is rebuilt from source on every build that touches `ebpf/`, never committed,
//! so it cannot drift from the source. Debian's clang 14 or later is enough; the headers come
//! from `libbpf-dev` (`bpf/bpf_helpers.h`) and the kernel UAPI headers (`linux-libc-dev`).
//!
//! The constants: every numeric `#define SLUICE_*` of `ebpf/sluice.h` and every value of
//! `enum sluice_counter_index` become a Rust `const` of the same name without `SLUICE_`, so the
//! Rust side cannot drift from the header. The header is read with a deliberately small reader
//! (integers, `(1u << n)`, `|`, earlier `SLUICE_*` names); clang then checks every value it read
//! (`_Static_assert`) and that no `SLUICE_*` macro was missed, so a misreading fails the build
//! instead of producing a wrong constant.

use std::{
    collections::BTreeSet,
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

const INSTALL_HINT: &str = "install it with `apt-get install clang llvm libbpf-dev` (Debian/Ubuntu) \
     or set SLUICE_CLANG to a clang that can target bpf";

/// Counter metric/CLI names that are not the enum name lowercased (with `DROP_` read as
/// `dropped_`): names users already scrape, kept as they were.
const COUNTER_RENAMES: &[(&str, &str)] = &[
    ("SLUICE_CTR_REPLY_ENCAP", "reply_encapsulated"),
    ("SLUICE_CTR_ERROR", "errors"),
    ("SLUICE_CTR_DROP_POD_TO_TUNNEL", "dropped_pod_to_tunnel_port"),
];

/// The enum value that is the capacity of `sluice_counters`, not a counter.
const COUNTER_CAPACITY: &str = "SLUICE_CTR_MAX";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let ebpf_dir = manifest_dir.join("../ebpf");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));

    println!("cargo:rerun-if-env-changed=SLUICE_CLANG");
    for file in ["sluice.bpf.c", "sluice.h"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(file).display());
    }

    let endian = env::var("CARGO_CFG_TARGET_ENDIAN").unwrap_or_else(|_| "little".to_owned());
    let clang = Clang {
        program: env::var("SLUICE_CLANG").unwrap_or_else(|_| "clang".to_owned()),
        target: if endian == "big" { "bpfeb" } else { "bpfel" },
        arch: match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
            Ok("aarch64") => "arm64",
            Ok("x86_64") | Err(_) => "x86",
            Ok(other) => other,
        }
        .to_owned(),
        include: ebpf_dir.clone(),
    };

    let header_path = ebpf_dir.join("sluice.h");
    let header =
        fs::read_to_string(&header_path).unwrap_or_else(|e| panic!("reading {}: {e}", header_path.display()));
    let constants = read_header(&header);
    check_with_clang(&clang, &constants, &out_dir);
    fs::write(out_dir.join("sluice_h.rs"), rust_constants(&constants))
        .expect("writing sluice_h.rs into OUT_DIR");

    clang.compile(&ebpf_dir.join("sluice.bpf.c"), &out_dir.join("sluice.bpf.o"));
}

/// A constant of `sluice.h`.
struct Constant {
    /// As in C (`SLUICE_KIND_GATEWAY`).
    c_name: String,
    value: u64,
    /// The comment on its line or on the line right above it.
    doc: Option<String>,
    /// A value of `enum sluice_counter_index` (else a `#define`).
    counter: bool,
    /// Used as an array length in the header: `usize` in Rust.
    length: bool,
}

/// The `#define SLUICE_*` numbers and the `enum sluice_counter_index` values of the header.
fn read_header(header: &str) -> Vec<Constant> {
    let (lines, comments) = split_comments(header);
    // The comment documenting line `i`: one that ends on it after code, or one ending right above.
    let doc_of = |i: usize| -> Option<String> {
        let trailing = comments.iter().find(|c| c.first_line == i && c.after_code);
        let above = comments.iter().find(|c| c.last_line + 1 == i && !c.after_code);
        trailing.or(above).map(|c| c.text.clone())
    };
    let code = lines.join("\n");

    let mut constants: Vec<Constant> = Vec::new();
    let mut in_counters = false;
    let mut next_counter = 0;
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix('#') {
            let Some(rest) = rest.trim_start().strip_prefix("define") else {
                continue;
            };
            let (name, value) = rest
                .trim()
                .split_once(char::is_whitespace)
                .unwrap_or((rest.trim(), ""));
            // An object-like macro without a value (the include guard) is no constant.
            if !name.starts_with("SLUICE_") || value.trim().is_empty() {
                continue;
            }
            let value = eval(value, &constants)
                .unwrap_or_else(|e| panic!("sluice.h line {}: `#define {name} {value}`: {e}", i + 1));
            constants.push(Constant {
                c_name: name.to_owned(),
                value,
                doc: doc_of(i),
                counter: false,
                length: code.contains(&format!("[{name}]")),
            });
        } else if line.starts_with("enum sluice_counter_index") {
            assert!(
                line.ends_with('{'),
                "sluice.h line {}: write `enum sluice_counter_index {{` on one line",
                i + 1
            );
            in_counters = true;
        } else if in_counters && line.starts_with('}') {
            in_counters = false;
        } else if in_counters && !line.is_empty() {
            let entry = line.trim_end_matches(',');
            let (name, value) = match entry.split_once('=') {
                Some((name, value)) => (
                    name.trim(),
                    eval(value, &constants)
                        .unwrap_or_else(|e| panic!("sluice.h line {}: `{line}`: {e}", i + 1)),
                ),
                None => (entry.trim(), next_counter),
            };
            assert!(
                name.starts_with("SLUICE_CTR_") && !name.contains(char::is_whitespace),
                "sluice.h line {}: expected one `SLUICE_CTR_NAME = value,` per line, found `{line}`",
                i + 1
            );
            next_counter = value + 1;
            constants.push(Constant {
                c_name: name.to_owned(),
                value,
                doc: doc_of(i),
                counter: true,
                length: false,
            });
        }
    }
    assert!(!in_counters, "sluice.h: enum sluice_counter_index is not closed");
    assert!(
        constants.iter().any(|c| c.c_name == COUNTER_CAPACITY),
        "sluice.h: enum sluice_counter_index has no {COUNTER_CAPACITY}"
    );
    for (c_name, _) in COUNTER_RENAMES {
        assert!(
            constants.iter().any(|c| c.counter && c.c_name == *c_name),
            "build.rs renames counter {c_name}, which sluice.h no longer has: update COUNTER_RENAMES"
        );
    }
    constants
}

/// A comment of the header, with the lines it spans.
struct Comment {
    first_line: usize,
    last_line: usize,
    /// Code precedes it on its first line (a trailing comment).
    after_code: bool,
    /// Its words, one space apart, without the `*` that starts continuation lines.
    text: String,
}

/// The header's lines with comments blanked out, and the comments.
fn split_comments(header: &str) -> (Vec<String>, Vec<Comment>) {
    let mut lines = vec![String::new()];
    let mut comments = Vec::new();
    let mut chars = header.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' => lines.push(String::new()),
            '/' if matches!(chars.peek(), Some('*') | Some('/')) => {
                let block = chars.next() == Some('*');
                let first_line = lines.len() - 1;
                let after_code = !lines[first_line].trim().is_empty();
                let mut text = String::new();
                loop {
                    match chars.next() {
                        None => break,
                        Some('*') if block && chars.peek() == Some(&'/') => {
                            chars.next();
                            break;
                        }
                        Some('\n') if !block => {
                            lines.push(String::new());
                            break;
                        }
                        Some('\n') => {
                            lines.push(String::new());
                            text.push('\n');
                        }
                        Some(c) => text.push(c),
                    }
                }
                let words: Vec<&str> = text
                    .lines()
                    .map(|l| l.trim().trim_start_matches('*'))
                    .flat_map(str::split_whitespace)
                    .collect();
                comments.push(Comment {
                    first_line,
                    last_line: if block { lines.len() - 1 } else { first_line },
                    after_code,
                    text: words.join(" "),
                });
                lines.last_mut().expect("never empty").push(' ');
            }
            c => lines.last_mut().expect("never empty").push(c),
        }
    }
    (lines, comments)
}

/// The value of a constant expression of the header: integers (decimal or `0x`, with `u`/`l`
/// suffixes), parentheses, `<<`, `|` and earlier `SLUICE_*` names. Anything else is an error:
/// extend this reader, or write the value plainly.
fn eval(expr: &str, known: &[Constant]) -> Result<u64, String> {
    let mut tokens = Vec::new();
    let mut rest = expr.trim();
    while !rest.is_empty() {
        let token_len = if rest.starts_with("<<") {
            2
        } else if rest.starts_with(['(', ')', '|']) {
            1
        } else {
            rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len())
        };
        if token_len == 0 {
            return Err(format!(
                "build.rs cannot read `{rest}` (extend `eval` in node-shim/build.rs)"
            ));
        }
        tokens.push(&rest[..token_len]);
        rest = rest[token_len..].trim_start();
    }
    let mut at = 0;
    let value = eval_or(&tokens, &mut at, known)?;
    match tokens.get(at) {
        None => Ok(value),
        Some(t) => Err(format!("unexpected `{t}` (extend `eval` in node-shim/build.rs)")),
    }
}

fn eval_or(tokens: &[&str], at: &mut usize, known: &[Constant]) -> Result<u64, String> {
    let mut value = eval_shift(tokens, at, known)?;
    while tokens.get(*at) == Some(&"|") {
        *at += 1;
        value |= eval_shift(tokens, at, known)?;
    }
    Ok(value)
}

fn eval_shift(tokens: &[&str], at: &mut usize, known: &[Constant]) -> Result<u64, String> {
    let mut value = eval_atom(tokens, at, known)?;
    while tokens.get(*at) == Some(&"<<") {
        *at += 1;
        let shift = eval_atom(tokens, at, known)?;
        value = u32::try_from(shift)
            .ok()
            .and_then(|s| value.checked_shl(s))
            .filter(|v| v >> shift == value)
            .ok_or_else(|| format!("{value} << {shift} overflows"))?;
    }
    Ok(value)
}

fn eval_atom(tokens: &[&str], at: &mut usize, known: &[Constant]) -> Result<u64, String> {
    let token = *tokens.get(*at).ok_or("expression ends early")?;
    *at += 1;
    if token == "(" {
        let value = eval_or(tokens, at, known)?;
        if tokens.get(*at) != Some(&")") {
            return Err("unbalanced parentheses".to_owned());
        }
        *at += 1;
        return Ok(value);
    }
    if token.starts_with(|c: char| c.is_ascii_digit()) {
        let digits = token.trim_end_matches(['u', 'U', 'l', 'L']);
        let parsed = match digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16),
            None if digits.len() > 1 && digits.starts_with('0') => u64::from_str_radix(digits, 8),
            None => digits.parse(),
        };
        return parsed.map_err(|e| format!("`{token}`: {e}"));
    }
    known
        .iter()
        .find(|c| c.c_name == token)
        .map(|c| c.value)
        .ok_or_else(|| format!("`{token}` is no number and no earlier SLUICE_ constant"))
}

/// Has clang confirm what [`read_header`] read: every value (`_Static_assert`), and that the
/// header defines no `SLUICE_*` macro with a value that it skipped.
fn check_with_clang(clang: &Clang, constants: &[Constant], out_dir: &Path) {
    let check = out_dir.join("sluice_h_check.c");
    let mut source = String::from("/* Generated by node-shim/build.rs. */\n#include \"sluice.h\"\n");
    for c in constants {
        source.push_str(&format!(
            "_Static_assert({name} == {value}ull, \"node-shim/build.rs read {name} as {value}\");\n",
            name = c.c_name,
            value = c.value
        ));
    }
    fs::write(&check, source).expect("writing sluice_h_check.c into OUT_DIR");
    let mut cmd = clang.command();
    cmd.arg("-fsyntax-only").arg(&check);
    clang.run(cmd, &check);

    let mut cmd = clang.command();
    cmd.args(["-E", "-dM"]).arg(clang.include.join("sluice.h"));
    let macros = clang.run(cmd, &clang.include.join("sluice.h"));
    let read: BTreeSet<&str> = constants.iter().map(|c| c.c_name.as_str()).collect();
    for line in macros.lines() {
        let mut words = line.split_whitespace();
        let (Some("#define"), Some(name), Some(_value)) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        assert!(
            !name.starts_with("SLUICE_") || read.contains(name),
            "sluice.h defines {name}, which node-shim/build.rs did not read: write it as \
             `#define {name} value` on one line"
        );
    }
}

/// The Rust source of the constants (`OUT_DIR/sluice_h.rs`).
fn rust_constants(constants: &[Constant]) -> String {
    let mut out =
        String::from("// Generated by node-shim/build.rs from ebpf/sluice.h: change the header, not this.\n");
    for c in constants {
        let rust_name = c
            .c_name
            .strip_prefix("SLUICE_")
            .expect("every constant read is SLUICE_*");
        let ty = if c.length { "usize" } else { "u32" };
        let value = u32::try_from(c.value)
            .unwrap_or_else(|_| panic!("{} = {} does not fit the u32 of the maps", c.c_name, c.value));
        let mut doc = format!("`{}` of `ebpf/sluice.h`", c.c_name);
        if let Some(text) = &c.doc {
            doc.push_str(": ");
            doc.push_str(&markdown_escaped(text));
        }
        out.push_str(&format!(
            "#[doc = {doc:?}]\npub const {rust_name}: {ty} = {value};\n"
        ));
    }

    let counters: Vec<&Constant> = constants
        .iter()
        .filter(|c| c.counter && c.c_name != COUNTER_CAPACITY)
        .collect();
    out.push_str(&format!(
        "/// Counter indexes of `sluice_counters` (`enum sluice_counter_index`) with their \
         metric/CLI names.\npub const COUNTER_NAMES: [(u32, &str); {}] = [\n",
        counters.len()
    ));
    for c in counters {
        out.push_str(&format!("    ({}, {:?}),\n", c.value, counter_name(&c.c_name)));
    }
    out.push_str("];\n");
    out
}

/// `SLUICE_CTR_DROP_NO_GATEWAY` -> `dropped_no_gateway`, unless [`COUNTER_RENAMES`] says otherwise.
fn counter_name(c_name: &str) -> String {
    if let Some((_, name)) = COUNTER_RENAMES.iter().find(|(c, _)| *c == c_name) {
        return (*name).to_owned();
    }
    let name = c_name
        .strip_prefix("SLUICE_CTR_")
        .expect("counter names start with SLUICE_CTR_")
        .to_ascii_lowercase();
    match name.strip_prefix("drop_") {
        Some(why) => format!("dropped_{why}"),
        None => name,
    }
}

/// C comment text as rustdoc shows it literally (`[x]` would be a link, `*x*` emphasis).
fn markdown_escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '\\' | '[' | ']' | '*' | '_' | '`' | '<' | '>' | '#') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// clang, set up for the bpf target and the header's directory.
struct Clang {
    program: String,
    target: &'static str,
    arch: String,
    include: PathBuf,
}

impl Clang {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(["-O2", "-g", "-Wall", "-Werror", "-target", self.target])
            .arg(format!("-D__TARGET_ARCH_{}", self.arch))
            .arg("-I")
            .arg(&self.include);
        // The UAPI headers include <asm/types.h>, which Debian keeps under the multiarch directory.
        for multiarch in ["/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu"] {
            if Path::new(multiarch).join("asm/types.h").exists() {
                cmd.arg("-I").arg(multiarch);
                break;
            }
        }
        cmd
    }

    fn compile(&self, src: &Path, out: &Path) {
        let mut cmd = self.command();
        cmd.arg("-c").arg(src).arg("-o").arg(out);
        self.run(cmd, src);
    }

    /// Runs clang on `src`; its standard output.
    fn run(&self, mut cmd: Command, src: &Path) -> String {
        let clang = &self.program;
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
            panic!("clang failed on {}:\n{stderr}{hint}", src.display());
        }
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}
