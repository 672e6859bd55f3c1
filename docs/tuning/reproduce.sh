#!/bin/bash
# One tuning run of docs/tuning/README.md with the project's own commands, from the repository root:
#   docs/tuning/reproduce.sh NAME SEED ROUNDS LOCAL_EPOCHS LR      e.g. docs/tuning/reproduce.sh lr9e4_10x2 0 10 2 0.0009
# federation (kept-alive clients, as the study) -> final checkpoint -> fp32 TFLite -> whole catalog in an f16
# usearch index on LiteRT -> catalog-search eval (the device protocol). Writes runs/tuning/NAME*.
set -euo pipefail
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export TF_CPP_MIN_LOG_LEVEL=3 KERAS_BACKEND=tensorflow
name=$1 seed=$2 rounds=$3 epochs=$4 lr=$5
out=runs/tuning/$name
catalog=$(.venv/bin/python -c "from catalog.sample import default_sample_path; print(default_sample_path())")
.venv/bin/fedcbir simulate --sample --clients 3 --frameworks torch,tf,jax --profiles rpi4,rpi5,jetson-nano-cpu \
  --partition iid --strategy fedavg --seed "$seed" --rounds "$rounds" --local-epochs "$epochs" --out "$out" \
  --set lr="$lr" --set fraction-evaluate=0 --set client-isolation=inline
last=$(ls "$out"/checkpoints/round-*.json | sort | tail -1)
.venv/bin/fedcbir export "${last%.json}" --out "$out-bundle" --formats tflite --quantize none
.venv/bin/catalog-search index --bundle "$out-bundle" --catalog "$catalog" --runtime litert --precision fp32
.venv/bin/catalog-search eval --bundle "$out-bundle" --catalog "$catalog" --runtime litert --precision fp32 \
  --seed "$seed" --json > "$out-eval.json"
python3 -c "import json,sys; print(sys.argv[1], json.load(open(sys.argv[2]))['index'])" "$name" "$out-eval.json"
