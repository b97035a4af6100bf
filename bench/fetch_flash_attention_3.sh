#!/usr/bin/env bash
# FlashAttention-3's Hopper kernels as xformers 0.0.34 ships them inside its wheel
# (xformers/flash_attn_3/_C.so). It references only PyTorch's stable C shim, so it should load
# on later PyTorch versions too. The library is 339 MiB, over what one device call can carry
# (64 MiB); xz brings it to 35 MiB, one part (.fa3-1/, git-ignored; bigger builds
# would split into .fa3-2/, ..., carried one per call and gathered in /tmp/fa3 while the
# machine stays warm). On the device:
#   mkdir -p /tmp/fa3 && cp .fa3-1/* /tmp/fa3/
#   bash bench/fetch_flash_attention_3.sh --assemble /tmp/site   # -> /tmp/site/xformers/flash_attn_3/_C.so
# ryla.speed.attention finds it through the `xformers` package folder on PYTHONPATH. The build
# links the CUDA 12 runtime, which the device's torch (cu130) lacks (seen: "libcudart.so.12:
# not found"), so the part folder also holds nvidia-cuda-runtime-cu12's wheel; --assemble puts
# its libcudart.so.12 next to _C.so, where ryla loads it before FA3. Not installed as a package:
# in site-packages beside a CUDA 13 torch it made cudnn-frontend decline fast's fp8 attention.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--assemble" ]]; then
  site="$2"
  mkdir -p "$site/xformers/flash_attn_3"
  touch "$site/xformers/__init__.py" "$site/xformers/flash_attn_3/__init__.py"
  cat /tmp/fa3/part-* | xz -d -T0 > "$site/xformers/flash_attn_3/_C.so"
  # python's zipfile, not unzip: the device image has no unzip
  python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("nvidia/cuda_runtime/lib/libcudart.so.12"))' \
    /tmp/fa3/nvidia_cuda_runtime_cu12-*.whl "$site/xformers/flash_attn_3/libcudart.so.12"
  ls -l "$site/xformers/flash_attn_3/_C.so"
  exit 0
fi
part_mib="${PART_MIB:-48}"
work="$(mktemp -d)"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$work" xformers==0.0.34 nvidia-cuda-runtime-cu12==12.9.79
unzip -q -o "$work"/xformers-0.0.34-*.whl 'xformers/flash_attn_3/_C.so' -d "$work"
rm -rf .fa3-*
xz -9 -T0 -c "$work/xformers/flash_attn_3/_C.so" | split -b "${part_mib}M" -d - "$work/part-"
i=1
for part in "$work"/part-*; do
  mkdir -p ".fa3-$i"
  mv "$part" ".fa3-$i/"
  i=$((i + 1))
done
mv "$work"/nvidia_cuda_runtime_cu12-*.whl .fa3-1/
rm -rf "$work"
grep -qx '/.fa3-\*/' .git/info/exclude || echo '/.fa3-*/' >> .git/info/exclude
du -sh .fa3-*
