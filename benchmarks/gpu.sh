#!/usr/bin/env bash
# The GPU benchmark of issue 18, one script, under 8 minutes on a GPU machine:
#   training overhead, top-5 Hessian eigenvalues of resnet20 at batch 512 (vs PyHessian), PGD and
#   APGD throughput (vs torchattacks), landscape time per point; each an absolute time and a
#   ratio, appended to benchmarks/RESULTS.md under the GPU's name.
# Usage:  benchmarks/gpu.sh            (on the GPU machine; needs the `bench` extra for the peers)
#         benchmarks/gpu.sh --smoke    (tiny models on any device, CPU included: checks it end to end)
# Other flags go to benchmarks/bench_gpu.py (--rounds N, --device, --results FILE, --parts ...).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi
# a full run has 8 minutes; the time limit ends it with the partial log rather than hang
limit="${GRADLAB_GPU_BENCH_LIMIT:-480}"
cd "$root"
exec timeout --signal=INT "$limit" "$python" "$here/bench_gpu.py" "$@"
