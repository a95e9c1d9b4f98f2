#!/usr/bin/env bash
# `make test-install`: the package as a user gets it. Builds the wheel (pip wheel, no build isolation,
# reusing the objects of the in-place build in build/), installs it into a fresh virtual environment
# outside the repository, and runs search, genotype, train --arch, train --quant fqsr, export and
# upscale there from a folder outside the repository, with tiny settings.
#
# The fresh environment gets the wheel only (--no-deps); torch and the other dependencies come from
# the repository's environment through a .pth line (no download, no second copy of torch). A .pth
# line adds a folder to sys.path without running that folder's own .pth files, so the repository's
# editable install of qnas stays invisible: the checks below fail if qnas or qops load from here.
#
# Usage: scripts/test_install.sh [PYTHON]   (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
py=${1:-.venv/bin/python}
py=$(cd "$(dirname "$py")" && pwd)/$(basename "$py")
work=$(mktemp -d "${TMPDIR:-/tmp}/qnas-test-install.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$SECONDS
step() { echo "test-install: $* ($((SECONDS - start)) s)"; }

step "building the wheel"
"$py" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" . >"$work/wheel.log" 2>&1 ||
	{ cat "$work/wheel.log"; exit 1; }
wheel=$(ls "$work"/dist/qnas-*.whl)
"$py" - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for want in ("qnas/spaces/basic.json", "qnas/spaces/rfdn.json", "qops/_C"):
    assert any(n.startswith(want) for n in names), f"test-install: the wheel has no {want}"
EOF

step "installing $(basename "$wheel") into a fresh environment"
"$py" -m venv "$work/venv"
venv_py=$work/venv/bin/python
site=$("$venv_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' >"$site/qnas-test-install-deps.pth"
"$venv_py" -m pip install -q --no-deps --no-index "$wheel"
qnas=$work/venv/bin/qnas

mkdir "$work/use" && cd "$work/use"
"$venv_py" - "$root" <<'EOF'
import sys
import qnas, qops
root = sys.argv[1]
for m in (qnas, qops):
    assert not m.__file__.startswith(root), f"{m.__name__} loads from the repository: {m.__file__}"
import torch
torch.ops.qops.fake_quant  # the compiled extension loads
EOF
"$qnas" --version

step "qnas search (tiny)"
"$qnas" search --space basic --scale 2 --steps 2 --batch-size 2 --patch-size 16 --lr-size 16x16 \
	--checkpoint-every 1 --out search --quiet
test -s search/genotype.json

step "qnas genotype"
"$qnas" genotype --space basic --scale 2 --op conv3x3 --bits 4 --lr-size 16x16 --out uniform4.json
test -s uniform4.json

step "qnas train --arch (tiny)"
"$qnas" train --arch search/genotype.json --steps 2 --batch-size 2 --patch-size 16 --out searched --quiet
test -s searched/model.pt

step "qnas train --quant fqsr (tiny), qnas export, qnas upscale"
"$qnas" train --model edsr-baseline --model-args '{"n_resblocks": 1, "n_feats": 8}' --scale 2 \
	--quant fqsr --bits 4 --steps 2 --batch-size 2 --patch-size 16 --out fqsr --quiet
"$qnas" export fqsr --format packed --out model.qnp
"$venv_py" -c 'import numpy as np; from PIL import Image
Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)).save("lr.png")'
"$qnas" upscale --model model.qnp lr.png sr.png --quiet
"$venv_py" - <<'EOF'
import os, stat
from PIL import Image
with Image.open("sr.png") as im:
    assert im.size == (20, 24), im.size
# Files get the usual permissions (0666 & ~umask), not mkstemp's 0600.
mask = os.umask(0)
os.umask(mask)
for f in ("sr.png", "model.qnp", "uniform4.json", "fqsr/model.pt"):
    mode = stat.S_IMODE(os.stat(f).st_mode)
    assert mode == 0o666 & ~mask, f"{f}: mode {oct(mode)}"
EOF
step "passed"
