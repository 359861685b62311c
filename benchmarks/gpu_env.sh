# Sourced by benchmarks/gpu_check.sh and gpu_study.sh on a CUDA machine that reaches no package
# registry: rcmseg runs from this source tree (PYTHONPATH) with the image's python3 (or $PY),
# which must hold torch with CUDA, and what that image lacks comes from the wheels that
# `bash benchmarks/gpu_check.sh --fetch-wheels` put in .whl/ (carry the folder there).
PY=${PY:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    SITE=$(mktemp -d /tmp/rcmseg-site.XXXX)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
