#!/usr/bin/env bash
# Train the photorealistic base field on the embedded 360° scene and render a turntable video.
set -euo pipefail
mmstyle-scene --kind object360 --out data/object360
ns-train mmstyle-base --data data/object360 --timestamp example --vis tensorboard --viewer.quit-on-train-completion True
mmstyle-camera-path --load-config outputs/object360/mmstyle-base/example/config.yml --output renders/turntable.json
ns-render camera-path --load-config outputs/object360/mmstyle-base/example/config.yml \
    --camera-path-filename renders/turntable.json --output-path renders/base_turntable.mp4
