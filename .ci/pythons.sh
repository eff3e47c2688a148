# Sourced by .ci/run and .ci/min-versions: find Python interpreters by version.
#
# `python3.X` on PATH may be a pyenv shim that fails unless that version is selected, so
# each candidate is run, not just looked up; pyenv's own install folders come last.

# find_python 3.X: prints the path of a working Python 3.X; status 1 if there is none.
find_python() {
	local want=$1 candidate root
	local -a candidates=("python$want" "/usr/local/bin/python$want" "/usr/bin/python$want")
	if command -v pyenv >/dev/null 2>&1 && root=$(pyenv root 2>/dev/null); then
		# Newest patch release first.
		while IFS= read -r candidate; do
			candidates+=("$candidate")
		done < <(ls -d "$root"/versions/"$want".*/bin/"python$want" 2>/dev/null | sort -rV)
	fi
	for candidate in "${candidates[@]}"; do
		# The interpreter's own path, not the shim's: it stays right whatever pyenv selects.
		if "$candidate" -c "import sys
if sys.version_info[:2] != tuple(map(int, '$want'.split('.'))):
    sys.exit(1)
print(sys.executable)" 2>/dev/null; then
			return 0
		fi
	done
	return 1
}

# newest_python 3.N: prints the version (3.X) of the newest working Python 3.X with X >= N.
newest_python() {
	local oldest=${1#3.} minor
	for ((minor = 20; minor >= oldest; minor--)); do
		if find_python "3.$minor" >/dev/null; then
			echo "3.$minor"
			return 0
		fi
	done
	return 1
}
