"""Build a licensed image set for training a small KL-f8 VAE from Debian's wallpaper packages.

Each package is fetched with ``apt-get download`` (Debian mirror only, no other network source), unpacked with
``dpkg-deb -x`` and its raster images are converted to RGB PNG (transparency composited over white), downscaled with
Pillow's LANCZOS so the longer side is at most ``--max-side``, and written atomically to
``DIR/<split>/<package>/<name>.png``. SVGs, symlinks, preview thumbnails (``screenshot.*``), images below 256 px on
the shorter side, smaller resolution variants of the same artwork and flat (single-colour) results, e.g. overlays that
are blank over white, are skipped and counted. Identical images are kept once (SHA-256 of the stored RGB pixels);
packages are processed in the order reserved-eval, heldout, train, so the copy that is kept is the one in the
evaluation split.

Splits are by package, never by file:

- ``train``: plasma-workspace-wallpapers, mate-backgrounds, mypaint-data-extras, lomiri-wallpapers
- ``heldout``: gnome-backgrounds, sway-backgrounds (replace with ``--heldout PKG ...``): mostly saturated graphics,
  the kind of image the mini VAE failed on
- ``reserved-eval``: ukui-wallpapers, reserved for evaluation outside the project; never train or calibrate on it.

Outputs: ``DIR/manifest.csv`` (one row per image), ``DIR/summary.json`` (per package: version, licences, counts),
``DIR/licenses/<package>.copyright`` and a ``copyright`` file beside each package's images. A package whose images
and manifest rows are complete is skipped on a rerun unless ``--force`` is given. A package that cannot be
fetched gets one line of output; the others go on, and the exit status is 1.

    python experiments/fetch_wallpapers.py                       # all default packages into the cache
    python experiments/fetch_wallpapers.py --out /data/wp --max-side 768
    python experiments/fetch_wallpapers.py --packages sway-backgrounds --force

The default DIR is ``$VAEPROBE_CACHE/wallpapers`` (else ``~/.cache/vaeprobe/wallpapers``).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, ImageStat

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vaeprobe._io import atomic_path, cache_dir, write_text_atomic# noqa: E402

TRAIN = ("plasma-workspace-wallpapers", "mate-backgrounds", "mypaint-data-extras", "lomiri-wallpapers")
HELDOUT = ("gnome-backgrounds", "sway-backgrounds")
RESERVED_EVAL = ("ukui-wallpapers",)  # evaluation outside the project only: never training or calibration
SPLIT_ORDER = ("reserved-eval", "heldout", "train")  # processing order: evaluation splits keep shared images
DEFAULT_PACKAGES = TRAIN + HELDOUT + RESERVED_EVAL

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
MIN_SHORT_SIDE = 256
FLAT_STDDEV = 1.0  # every channel's pixel standard deviation below this: a single-colour image
MANIFEST_COLUMNS = ["split", "package", "version", "file", "source_path_in_deb", "width", "height", "sha256", "license"]
_RESOLUTION = re.compile(r"[_-]?\d{3,5}x\d{3,5}")
_DEP5_FORMAT = re.compile(r"^Format:\s*\S*copyright-format", re.MULTILINE)


@dataclass
class Candidate:
    """One raster image inside an unpacked package."""

    rel: str  # path inside the .deb, e.g. usr/share/backgrounds/mate/nature/Aqua.jpg
    size: tuple[int, int]


@dataclass
class PackageResult:
    """Manifest rows and summary entry of one processed package."""

    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


# --- command line and splits -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: <vaeprobe cache>/wallpapers)")
    ap.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES), metavar="PKG")
    ap.add_argument("--heldout", nargs="+", default=list(HELDOUT), metavar="PKG",
                    help="packages that form the held-out split (whole packages)")
    ap.add_argument("--max-side", type=int, default=1024, help="longest side of the stored images")
    ap.add_argument("--keep-variants", action="store_true",
                    help="keep every resolution variant of an artwork, not only the largest")
    ap.add_argument("--force", action="store_true", help="redo packages that are already complete")
    args = ap.parse_args(argv)
    if args.max_side < MIN_SHORT_SIDE:
        ap.error(f"--max-side must be at least {MIN_SHORT_SIDE}")
    return args


def assign_split(package: str, heldout: set[str]) -> str:
    """``reserved-eval`` for the reserved packages (cannot be overridden), else ``heldout`` or ``train``."""
    if package in RESERVED_EVAL:
        return "reserved-eval"
    return "heldout" if package in heldout else "train"


def processing_order(packages: list[str], heldout: set[str]) -> list[str]:
    """Unique packages, evaluation splits first (stable within a split)."""
    unique = list(dict.fromkeys(packages))
    return sorted(unique, key=lambda p: SPLIT_ORDER.index(assign_split(p, heldout)))


# --- apt / dpkg ----------------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _last_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:")]
    return (errors or lines or ["no output"])[-1]


def download_deb(package: str, workdir: Path) -> Path:
    """``apt-get download`` one package into ``workdir``; raise RuntimeError with one line on failure."""
    proc = _run(["apt-get", "download", package], cwd=workdir)
    if proc.returncode != 0:
        raise RuntimeError(f"apt-get download failed (rc={proc.returncode}): {_last_error(proc)}")
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"expected one {package}_*.deb after apt-get download, found {len(debs)}")
    return debs[0]


def deb_field(deb: Path, name: str) -> str:
    proc = _run(["dpkg-deb", "-f", str(deb), name])
    if proc.returncode != 0:
        raise RuntimeError(f"dpkg-deb -f failed (rc={proc.returncode}): {_last_error(proc)}")
    return proc.stdout.strip()


def extract_deb(deb: Path, dest: Path) -> None:
    proc = _run(["dpkg-deb", "-x", str(deb), str(dest)])
    if proc.returncode != 0:
        raise RuntimeError(f"dpkg-deb -x failed (rc={proc.returncode}): {_last_error(proc)}")


# --- licences ------------------------------------------------------------------------------------------------------


def parse_dep5(text: str) -> list[tuple[list[str], str]] | None:
    """``[(file patterns, licence short name), ...]`` of a machine-readable copyright file, else None."""
    if not _DEP5_FORMAT.search(text.lstrip()):
        return None
    stanzas = []
    for block in re.split(r"\n\s*\n", text.strip()):
        fields = _stanza_fields(block)
        if "Files" in fields and "License" in fields:
            stanzas.append((fields["Files"].split(), fields["License"].splitlines()[0].strip()))
    return stanzas


def _stanza_fields(block: str) -> dict[str, str]:
    """Fields of one DEP-5 paragraph; continuation lines (leading whitespace) are appended to the field."""
    fields: dict[str, str] = {}
    key = None
    for line in block.splitlines():
        match = re.match(r"^([A-Za-z][A-Za-z-]*):(.*)$", line)
        if match and not line[0].isspace():
            key = match.group(1)
            fields[key] = match.group(2).strip()
        elif key is not None:
            fields[key] += "\n" + line.strip()
    return fields


def dep5_license(rel: str, stanzas: list[tuple[list[str], str]]) -> str:
    """Licence of the last ``Files`` paragraph matching ``rel``; patterns are matched as path suffixes because
    DEP-5 paths are relative to the source tree while ``rel`` is the installed path."""
    found = "UNKNOWN (no Files paragraph matches)"
    for patterns, license_name in stanzas:
        if any(_dep5_match(rel, pattern) for pattern in patterns):
            found = license_name
    return found


def _dep5_match(rel: str, pattern: str) -> bool:
    pattern = pattern.replace("[", "[[]")  # DEP-5 only knows * and ?
    return fnmatch.fnmatchcase(rel, pattern) or fnmatch.fnmatchcase(rel, "*/" + pattern)


def free_text_licenses(text: str, limit: int = 4) -> str:
    """First distinct licence statements of a copyright file that is not DEP-5: lines mentioning a licence (not
    section headers ending in ``:``), each continued up to the end of its sentence."""
    lines = [ln.strip() for ln in text.splitlines()]
    found: list[str] = []
    for i, line in enumerate(lines):
        if not re.search(r"licen[cs]", line, re.IGNORECASE) or line.endswith(":"):
            continue
        statement = line
        for nxt in lines[i + 1:i + 4]:
            if statement.endswith(".") or not nxt:
                break
            statement += " " + nxt
        if statement not in found:
            found.append(statement)
        if len(found) == limit:
            break
    return "free text: " + " | ".join(found) if found else "UNKNOWN (no licence statement found)"


def read_copyright(root: Path, package: str) -> str:
    path = root / "usr/share/doc" / package / "copyright"
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


def license_lookup(text: str):
    """A function ``rel -> licence`` for one package's copyright text, and the text's format name."""
    if not text:
        return (lambda rel: "UNKNOWN (no copyright file)"), "missing"
    stanzas = parse_dep5(text)
    if stanzas is None:
        summary = free_text_licenses(text)
        return (lambda rel: summary), "free-text"
    return (lambda rel: dep5_license(rel, stanzas)), "dep5"


# --- finding and filtering images ----------------------------------------------------------------------------------


def find_candidates(root: Path, skipped: Counter) -> list[Candidate]:
    """Raster images of an unpacked package (outside usr/share/doc); counts what it passes over in ``skipped``."""
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        suffix = path.suffix.lower()
        if rel.startswith("usr/share/doc/") or suffix not in RASTER_SUFFIXES | {".svg"}:
            continue
        reason = _file_skip_reason(path, suffix)
        if reason:
            skipped[reason] += 1
            continue
        try:
            with Image.open(path) as im:
                found.append(Candidate(rel, im.size))
        except (OSError, ValueError):
            skipped["unreadable"] += 1
    return found


def _file_skip_reason(path: Path, suffix: str) -> str | None:
    if path.is_symlink():
        return "symlink"
    if not path.is_file():
        return "not-a-file"
    if suffix == ".svg":
        return "svg"
    if path.stat().st_size == 0:
        return "empty"
    if path.stem.lower() == "screenshot":
        return "thumbnail"
    return None


def drop_small(candidates: list[Candidate], skipped: Counter) -> list[Candidate]:
    kept = [c for c in candidates if min(c.size) >= MIN_SHORT_SIDE]
    skipped["small"] += len(candidates) - len(kept)
    return kept


def variant_key(rel: str) -> str:
    """Path with resolution tokens (``_1920x1080``) and the suffix removed: equal for variants of one artwork."""
    parent, _, name = rel.rpartition("/")
    return f"{parent}/{_RESOLUTION.sub('', Path(name).stem).lower()}"


def keep_largest_variants(candidates: list[Candidate], skipped: Counter) -> list[Candidate]:
    """Of candidates sharing a :func:`variant_key`, keep the one with the most pixels (first on ties)."""
    best: dict[str, Candidate] = {}
    for cand in candidates:
        key = variant_key(cand.rel)
        if key not in best or cand.size[0] * cand.size[1] > best[key].size[0] * best[key].size[1]:
            best[key] = cand
    kept = [c for c in candidates if best[variant_key(c.rel)] is c]
    skipped["resolution-variant"] += len(candidates) - len(kept)
    return kept


# --- conversion ----------------------------------------------------------------------------------------------------


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB image; any transparency is composited over white. EXIF orientation is applied."""
    im = ImageOps.exif_transpose(im)
    if has_alpha(im):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def downscale(im: Image.Image, max_side: int) -> Image.Image:
    """Shrink (never enlarge) so the longer side is at most ``max_side``, Pillow LANCZOS."""
    scale = max_side / max(im.size)
    if scale >= 1:
        return im
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.Resampling.LANCZOS)


def is_flat(im: Image.Image) -> bool:
    return max(ImageStat.Stat(im).stddev) < FLAT_STDDEV


def pixel_sha256(im: Image.Image) -> str:
    """SHA-256 of the decoded RGB pixels (size header + raw bytes), independent of the PNG encoding."""
    digest = hashlib.sha256(f"{im.width}x{im.height}\n".encode())
    digest.update(im.tobytes())
    return digest.hexdigest()


def output_name(rel: str, prefix: str, used: set[str]) -> str:
    """File name from the image's path below the package's common image folder, e.g. ``Altai--images--5120x2880``."""
    tail = rel[len(prefix):].lstrip("/") if prefix else rel
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", "--".join(Path(tail).with_suffix("").parts))
    name, n = f"{stem}.png", 2
    while name in used:
        name, n = f"{stem}-{n}.png", n + 1
    used.add(name)
    return name


def common_prefix(rels: list[str]) -> str:
    if not rels:
        return ""
    parents = [r.rsplit("/", 1)[0] for r in rels]
    prefix = parents[0].split("/")
    for parent in parents[1:]:
        parts = parent.split("/")
        n = 0
        while n < min(len(prefix), len(parts)) and prefix[n] == parts[n]:
            n += 1
        prefix = prefix[:n]
    return "/".join(prefix)


def save_png(im: Image.Image, target: Path) -> None:
    with atomic_path(target) as tmp:
        im.save(tmp, format="PNG")


# --- one package ---------------------------------------------------------------------------------------------------


def process_package(package: str, split: str, out: Path, args: argparse.Namespace,
                    seen: dict[str, str]) -> PackageResult:
    """Download, unpack, filter, convert and write one package; raises RuntimeError with one line on failure."""
    with tempfile.TemporaryDirectory(prefix=f"vaeprobe-{package}-") as tmp:
        work = Path(tmp)
        deb = download_deb(package, work)
        version = deb_field(deb, "Version")
        root = work / "root"
        extract_deb(deb, root)
        text = read_copyright(root, package)
        for old_split in SPLIT_ORDER:  # the package may have moved split since an earlier run
            shutil.rmtree(out / old_split / package, ignore_errors=True)
        dest = out / split / package
        write_text_atomic(dest / "copyright", text)
        write_text_atomic(out / "licenses" / f"{package}.copyright", text)
        skipped: Counter = Counter()
        candidates = select_candidates(root, skipped, args.keep_variants)
        rows = convert_all(candidates, root, dest, out, seen, skipped, args.max_side)
    license_of, fmt = license_lookup(text)
    for row in rows:
        row.update(split=split, package=package, version=version, license=license_of(row["source_path_in_deb"][1:]))
    summary = {
        "split": split, "version": version, "status": "complete", "copyright_format": fmt,
        "licenses": sorted({row["license"] for row in rows}), "images": len(rows),
        "skipped": {k: v for k, v in sorted(skipped.items()) if v},
        "max_side": args.max_side, "keep_variants": args.keep_variants,
    }
    return PackageResult(rows, summary)


def select_candidates(root: Path, skipped: Counter, keep_variants: bool) -> list[Candidate]:
    candidates = drop_small(find_candidates(root, skipped), skipped)
    return candidates if keep_variants else keep_largest_variants(candidates, skipped)


def convert_all(candidates: list[Candidate], root: Path, dest: Path, out: Path, seen: dict[str, str],
                skipped: Counter, max_side: int) -> list[dict]:
    """Convert and write each candidate; drops flat images and pixel-identical duplicates (``seen``: sha -> file)."""
    prefix = common_prefix([c.rel for c in candidates])
    used: set[str] = set()
    rows = []
    for cand in candidates:
        try:
            with Image.open(root / cand.rel) as src:
                alpha, im = has_alpha(src), downscale(to_rgb(src), max_side)
        except (OSError, ValueError, Image.DecompressionBombError):
            skipped["unreadable"] += 1
            continue
        if is_flat(im):  # an overlay whose picture is only in its alpha channel is blank over white
            skipped["flat-over-white" if alpha else "flat"] += 1
            continue
        sha = pixel_sha256(im)
        if sha in seen:
            skipped["duplicate"] += 1
            continue
        target = dest / output_name(cand.rel, prefix, used)
        save_png(im, target)
        seen[sha] = target.relative_to(out).as_posix()
        rows.append({"file": seen[sha], "source_path_in_deb": "/" + cand.rel, "width": im.width,
                     "height": im.height, "sha256": sha})
    return rows


# --- state: manifest and summary -----------------------------------------------------------------------------------


def load_state(out: Path) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    manifest = out / "manifest.csv"
    if manifest.is_file():
        with manifest.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    return rows, summary.get("packages", {})


def is_complete(out: Path, package: str, split: str, rows: list[dict], entry: dict | None,
                args: argparse.Namespace) -> bool:
    """True when an earlier run finished ``package`` with the same split and options and every image exists."""
    if not entry or entry.get("status") != "complete" or entry.get("split") != split:
        return False
    if entry.get("max_side") != args.max_side or entry.get("keep_variants") != args.keep_variants:
        return False
    mine = [r for r in rows if r["package"] == package]
    return len(mine) == entry.get("images") and all((out / r["file"]).is_file() for r in mine)


def write_state(out: Path, rows: list[dict], packages: dict) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    order = {s: i for i, s in enumerate(SPLIT_ORDER)}
    writer.writerows(sorted(rows, key=lambda r: (order.get(r["split"], 9), r["package"], r["file"])))
    write_text_atomic(out / "manifest.csv", buf.getvalue())
    summary = {
        "source": "Debian packages via apt-get download; see licenses/<package>.copyright",
        "splits": {s: sorted(p for p, e in packages.items() if e.get("split") == s and e.get("status") == "complete")
                   for s in SPLIT_ORDER},
        "reserved-eval_note": "evaluation outside the project only; never use for training or calibration",
        "packages": dict(sorted(packages.items())),
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")


def print_table(rows: list[dict], packages: dict) -> None:
    print(f"\n{'split':<14} {'packages':>8} {'images':>7}")
    for split in SPLIT_ORDER:
        names = {r["package"] for r in rows if r["split"] == split}
        print(f"{split:<14} {len(names):>8} {sum(r['split'] == split for r in rows):>7}")
    print(f"{'total':<14} {len({r['package'] for r in rows}):>8} {len(rows):>7}")
    failed = sorted(p for p, e in packages.items() if e.get("status") == "failed")
    if failed:
        print("failed (no images): " + ", ".join(failed))


# --- main ----------------------------------------------------------------------------------------------------------


def run_one(package: str, split: str, out: Path, args: argparse.Namespace, rows: list[dict],
            packages: dict) -> tuple[list[dict], bool]:
    """Process one package; return the updated manifest rows and success (``packages`` is updated in place)."""
    others = [r for r in rows if r["package"] != package]
    seen = {r["sha256"]: r["file"] for r in others}
    start = time.monotonic()
    try:
        result = process_package(package, split, out, args, seen)
    except (RuntimeError, OSError) as exc:
        print(f"{package}: FAILED, skipped: {exc}")
        if packages.get(package, {}).get("status") != "complete":
            packages[package] = {"split": split, "status": "failed", "error": str(exc)}
        return rows, False
    packages[package] = result.summary
    print(f"{package} {result.summary['version']} -> {split}: {len(result.rows)} images, "
          f"skipped {result.summary['skipped']} ({time.monotonic() - start:.1f} s)")
    return others + result.rows, True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = (args.out or cache_dir() / "wallpapers").expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    heldout = set(args.heldout)
    for pkg in sorted(heldout & set(RESERVED_EVAL)):
        print(f"{pkg}: reserved for evaluation outside the project; kept in reserved-eval, not heldout")
    rows, packages = load_state(out)
    start, failed = time.monotonic(), []
    for package in processing_order(args.packages, heldout):
        split = assign_split(package, heldout)
        if not args.force and is_complete(out, package, split, rows, packages.get(package), args):
            print(f"{package}: complete in {split}, skipped (use --force to redo)")
            continue
        rows, ok = run_one(package, split, out, args, rows, packages)
        failed += [] if ok else [package]
        write_state(out, rows, packages)
    write_state(out, rows, packages)
    print_table(rows, packages)
    print(f"output: {out} ({time.monotonic() - start:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
