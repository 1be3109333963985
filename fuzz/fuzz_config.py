"""Fuzz target: the config loader (a TOML file and ``CAPLANCE_*`` variables, or plain data).

Contract (``caplance.configfile``'s docstring): ``load_balancer_config`` /
``load_agent_config`` return a config or raise ``ConfigError`` -- for any file content and
any environment -- and so does ``caplance.config.structure`` for any plain data. A config
that loads also unstructures to plain data that structures back to an equal config.

The first input byte picks the mode and the config class. TOML mode: the rest is split at
the first ``\\n%%\\n`` into the file's text and ``NAME=value`` lines of environment variables
(``CAPLANCE_`` is prefixed). Data mode: the rest is JSON, structured directly (what a
program building a config from a dict does).

    python fuzz/fuzz_config.py [libFuzzer options] [corpus dir]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import atheris
import attrs

with atheris.instrument_imports(include=["caplance"]):
    from caplance.config import AgentConfig, BalancerConfig, structure, unstructure
    from caplance.configfile import load
    from caplance.errors import ConfigError

from findings import Broken, record

TARGET = "config"
_FOLDER = Path(tempfile.mkdtemp(prefix="caplance-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
_FILE = _FOLDER / "config.toml"


def _environment(text: str) -> dict[str, str]:
    environ = {}
    for line in text.splitlines():
        name, _, value = line.partition("=")
        if name and "\x00" not in line:
            environ["CAPLANCE_" + name.upper()] = value
    environ.pop("CAPLANCE_SECRET", None)  # the secret is read from the environment as is
    return environ


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0], data[1:]
    cls = AgentConfig if mode & 1 else BalancerConfig
    try:
        try:
            if mode & 2:
                try:
                    plain = json.loads(rest)
                except (ValueError, RecursionError):
                    return
                config = structure(plain, cls)
            else:
                text, _, variables = rest.decode("utf-8", "replace").partition("\n%%\n")
                _FILE.write_text(text, encoding="utf-8", errors="surrogatepass")
                config = load(_FILE, cls, environ=_environment(variables))
        except ConfigError:
            return
        if getattr(config, "secret", None) is not None:  # a secret_file it found: never unstructured
            config = attrs.evolve(config, secret=None)
        if structure(unstructure(config), cls) != config:
            raise Broken("a loaded config does not survive unstructure -> structure")
    except Exception as exc:  # noqa: BLE001 - anything else is a finding
        record(TARGET, data, exc)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
