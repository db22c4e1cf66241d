#!/usr/bin/env bash
# Install everything mpqc needs on a fresh Debian machine (run as root, non-interactive):
# the Fashion-MNIST data (Debian package dataset-fashion-mnist) and the Python package with its dev extras.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist
have_fashion_mnist() {
    local name
    for name in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
        [[ -f "$FASHION_MNIST_DIR/$name" ]] || return 1
    done
}

if have_fashion_mnist; then
    step "Fashion-MNIST already in $FASHION_MNIST_DIR"
else
    step "apt-get install dataset-fashion-mnist"
    DEBIAN_FRONTEND=noninteractive apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dataset-fashion-mnist
fi

step "pip install -e '.[dev]'"
python3 -m pip install -q -e '.[dev]'
