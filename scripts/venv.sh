# Sourced by scripts/test and bench/run.
# venv DIR REQUIREMENTS: creates DIR when absent and installs REQUIREMENTS into it, again
# only when the file changed since the last successful install.
venv() {
    local dir=$1 reqs=$2
    if [[ ! -x "$dir/bin/python" ]]; then
        echo "==> creating $dir"
        python3 -m venv "$dir"
    fi
    local stamp
    stamp="$dir/.requirements-$(sha256sum "$reqs" | cut -c1-16).stamp"
    if [[ ! -f "$stamp" ]]; then
        echo "==> installing $reqs into $dir"
        "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -r "$reqs"
        rm -f "$dir"/.requirements-*.stamp
        touch "$stamp"
    fi
}
