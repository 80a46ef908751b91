#!/usr/bin/env bash
# One H100/H200, under 8 minutes: the Wan2.1 1.3B architecture (random weights, all 30 layers) at
# 832x480, 4 steps, bf16 — frames/s with the Wan VAE decode and with TAEHV, time to first frame, time per
# DiT call, attention backend, MFU, with and without --compile. Writes JSON to $OUT (or bench-results/).
#   bash benchmarks/gpu.sh            (CHUNKS=… to change the chunk count; SMOKE=1: a tiny CPU dry run)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python3 -c "import streamgen" 2>/dev/null; then
    python3 -m pip install -q -e . >/dev/null
fi
if [ "${SMOKE:-0}" = 1 ]; then  # the same commands on the CPU at a toy size: checks the script, not the GPU
    common=(--model wan2.1-t2v-1.3b --size 208x128 --layers 1 --chunks "${CHUNKS:-2}" --device cpu --dtype fp32)
else
    # a bounded window (LongLive's), so any chunk count fits; steady figures are chunks 10 and later
    common=(--model wan2.1-t2v-1.3b --size 832x480 --chunks "${CHUNKS:-24}" --device cuda --dtype bf16
            --policy window_sink)
fi
python3 - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
run() {  # name, extra flags
    local name="$1"; shift
    echo "== $name"
    timeout 110 streamgen bench engine "${common[@]}" "$@" --quiet --out "$out/gpu-$name.json" || echo "!! $name failed ($?)"
}
run taehv --decoder taehv
run vae --decoder vae
run taehv-compile --decoder taehv --compile
run dit-only-compile --decoder none --compile
python3 - "$out" <<'PY'
import json, pathlib, sys
rows = []
for path in sorted(pathlib.Path(sys.argv[1]).glob("gpu-*.json")):
    r = json.loads(path.read_text())
    rows.append({"run": path.stem, "fps_with_decode": r.get("video_frames_per_s_with_decode"),
                 "ttff_s": r.get("time_to_first_frame_s"), "dit_call_ms": r.get("dit_call_ms"),
                 "attention": r.get("attention_backend"), "mfu": r.get("mfu"), "decode_ms_p50": r.get("decode_ms_p50"),
                 "peak_gpu_mb": r.get("peak_gpu_mb"), "gpu": r["machine"].get("gpu")})
pathlib.Path(sys.argv[1], "gpu-summary.json").write_text(json.dumps(rows, indent=1))
for row in rows:
    print(row)
PY
