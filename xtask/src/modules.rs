//! Kernel modules of an unpacked Debian kernel package: finding them by name, resolving their
//! dependencies from `.modinfo`, and reading them decompressed.

use crate::assets::single;
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel modules of one unpacked kernel package, by module name.
pub struct Modules {
    dir: PathBuf,
    /// The kernel release, the name of the directory under `lib/modules`.
    pub release: String,
    by_name: BTreeMap<String, String>,
    /// Modules built into the kernel (`modules.builtin`), which need no file.
    builtin: HashSet<String>,
}

impl Modules {
    /// Indexes the modules of the kernel package unpacked at `pkg`.
    pub fn open(pkg: &Path) -> Result<Modules, String> {
        let release_dir = single(&pkg.join("lib/modules"), "")?;
        let release = release_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let mut files = Vec::new();
        walk(&release_dir.join("kernel"), &mut files)
            .map_err(|e| format!("listing kernel modules: {e}"))?;
        let mut by_name = BTreeMap::new();
        for f in files {
            let rel = f
                .strip_prefix(&release_dir)
                .unwrap_or(&f)
                .to_string_lossy()
                .into_owned();
            let base = rel.rsplit('/').next().unwrap_or_default();
            if let Some(stem) = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
                .iter()
                .find_map(|s| base.strip_suffix(s))
            {
                by_name.insert(stem.replace('-', "_"), rel);
            }
        }
        let builtin = fs::read_to_string(release_dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko"))
            .map(|n| n.replace('-', "_"))
            .collect();
        Ok(Modules {
            dir: release_dir,
            release,
            by_name,
            builtin,
        })
    }

    /// The module's file, relative to `lib/modules/RELEASE`.
    fn rel(&self, name: &str) -> Result<&str, String> {
        let name = name.replace('-', "_");
        self.by_name
            .get(&name)
            .map(String::as_str)
            .ok_or_else(|| format!("kernel module {name} not found in {}", self.release))
    }

    /// The names of `names` and everything they depend on, each module after its dependencies;
    /// modules built into the kernel are left out.
    pub fn resolve(&self, names: &[&str]) -> Result<Vec<String>, String> {
        fn visit(
            m: &Modules,
            name: &str,
            seen: &mut HashSet<String>,
            out: &mut Vec<String>,
        ) -> Result<(), String> {
            let name = name.replace('-', "_");
            if !seen.insert(name.clone()) || (m.builtin.contains(&name) && m.rel(&name).is_err()) {
                return Ok(());
            }
            for dep in depends(&m.load(&name)?) {
                visit(m, &dep, seen, out)?;
            }
            out.push(name);
            Ok(())
        }
        let (mut seen, mut out) = (HashSet::new(), Vec::new());
        for n in names {
            visit(self, n, &mut seen, &mut out)?;
        }
        Ok(out)
    }

    /// The module's file, decompressed.
    pub fn load(&self, name: &str) -> Result<Vec<u8>, String> {
        let rel = self.rel(name)?;
        let path = self.dir.join(rel);
        let tool = match rel.rsplit('.').next() {
            Some("xz") => "xz",
            Some("zst") => "zstd",
            Some("gz") => "gzip",
            _ => return fs::read(&path).map_err(|e| format!("read {}: {e}", path.display())),
        };
        let out = Command::new(tool)
            .arg("-dc")
            .arg(&path)
            .output()
            .map_err(|e| format!("cannot run {tool}: {e}"))?;
        if !out.status.success() {
            return Err(format!("{tool} -dc {} failed", path.display()));
        }
        Ok(out.stdout)
    }

    /// Where the decompressed module goes, relative to `lib/modules/RELEASE`.
    pub fn out_name(&self, name: &str) -> String {
        let rel = self.rel(name).unwrap_or(name);
        let end = rel.rfind(".ko").map_or(rel.len(), |i| i + 3);
        rel[..end].to_string()
    }
}

/// The `depends=` list of a module's `.modinfo`.
fn depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &ko[at + KEY.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The `alias=` entries of a module's `.modinfo` (what `modules.alias` lists for it).
pub fn aliases(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0alias=";
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = ko[from..].windows(KEY.len()).position(|w| w == KEY) {
        let rest = &ko[from + at + KEY.len()..];
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        out.push(String::from_utf8_lossy(&rest[..end]).into_owned());
        from += at + KEY.len() + end;
    }
    out
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            walk(&e.path(), out)?;
        } else {
            out.push(e.path());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn depends_from_modinfo() {
        let ko = b"\x7fELF...\0license=GPL\0depends=kvm,irqbypass\0name=kvm_amd\0";
        assert_eq!(super::depends(ko), ["kvm", "irqbypass"]);
        assert!(super::depends(b"\0depends=\0name=x\0").is_empty());
        assert!(super::depends(b"no modinfo").is_empty());
    }

    #[test]
    fn aliases_from_modinfo() {
        let ko = b"\0alias=acpi*:LNRO0005:*\0depends=virtio\0alias=of:N*T*Cvirtio,mmio\0";
        assert_eq!(
            super::aliases(ko),
            ["acpi*:LNRO0005:*", "of:N*T*Cvirtio,mmio"]
        );
        assert!(super::aliases(b"none").is_empty());
    }
}
