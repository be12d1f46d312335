"""Convert a published TAESD-family pair (``NAME_encoder.pth`` + ``NAME_decoder.pth``) to safetensors.

    python experiments/convert_taesd.py ../shared/taef2 vaeprobe/models/builtin/taef2

reads the two plain state dicts with ``torch.load(weights_only=True)``, checks that they load strictly into
:class:`vaeprobe.models.taesd.TAESD`, and writes ``NAME_encoder.safetensors`` / ``NAME_decoder.safetensors`` with the
tensors unchanged (same dtype, bit for bit), plus the LICENSE file found beside the source. This is how
``builtin:taef2`` was made from ``../shared/taef2``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from vaeprobe.models.taesd import TAESD, _read_state_dict, find_pair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="folder with NAME_encoder.pth and NAME_decoder.pth")
    ap.add_argument("out", help="folder to write")
    args = ap.parse_args()
    src, out = Path(args.source), Path(args.out)
    enc_path, dec_path = find_pair(src) or (None, None)
    if enc_path is None:
        raise SystemExit(f"{src}: no encoder/decoder pair")
    enc, dec = _read_state_dict(enc_path), _read_state_dict(dec_path)
    TAESD.from_state_dicts(enc, dec)  # strict load: the layout fits
    out.mkdir(parents=True, exist_ok=True)
    for path, sd in ((enc_path, enc), (dec_path, dec)):
        target = out / (path.stem + ".safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(target), metadata={"source": path.name})
        back = _read_state_dict(target)
        assert all(torch.equal(back[k], v) for k, v in sd.items())
        print(f"{path} -> {target} ({len(sd)} tensors, {sum(v.numel() for v in sd.values())} values)")
    if (src / "LICENSE").exists():
        shutil.copy(src / "LICENSE", out / "LICENSE")


if __name__ == "__main__":
    main()
