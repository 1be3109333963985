"""The docs site: the strict build passes, the generated pages cover the code, and what the
pages show (config examples, counters) is what the code does.

The build needs the ``docs`` extra (mkdocs, mkdocs-material, mkdocstrings); without it those
tests are skipped.
"""

from __future__ import annotations

import html
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import attrs
import pytest

from caplance import plugins
from caplance.cli import build_parser
from caplance.config import (
    AgentConfig,
    AnnounceConfig,
    BackendConfig,
    BalancerConfig,
    ConntrackConfig,
    DecapConfig,
    FastpathConfig,
    HealthCheckConfig,
    ListenerConfig,
    LocalCheckConfig,
    PluginConfig,
    Secret,
    VipConfig,
    structure,
)
from caplance.configfile import apply_environment
from caplance.security import control_security

from .test_selectors import example_plugin  # noqa: F401 - the fixture that installs it

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
MINIMAL: dict[str, Any] = {"vips": [{"address": "10.99.0.1"}]}
needs_mkdocs = pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                                  reason="the docs extra is not installed (pip install -e '.[docs]')")


def load_hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("caplance_docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = load_hooks()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("the docs extra is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-5000:]}"
    return out


@needs_mkdocs
def test_the_strict_build_passes_and_has_every_page(site: Path) -> None:
    for page in ["quickstart", "concepts", "configuration", "cli", "operations", "plugins",
                 "troubleshooting", "benchmarks", "components/listeners", "components/selectors",
                 "components/transports", "components/balancer", "components/agent",
                 "components/control", "components/health", "api/library", "api/contracts",
                 "api/builtins"]:
        assert (site / page / "index.html").is_file(), page
    assert not list(site.rglob("*.py")), "docs/*.py (hooks) must not be published"


@needs_mkdocs
def test_the_generated_pages_are_in_the_site(site: Path) -> None:
    configuration = (site / "configuration" / "index.html").read_text()
    for root in hooks.ROOTS:
        for _, cls, _ in hooks.rows(hooks.ROOTS[root]):
            assert f'id="{hooks.anchor(cls, root)}"' in configuration
    assert "CAPLANCE_VIPS__&lt;N&gt;__BACKENDS__&lt;N&gt;__TRANSPORT__OPTIONS__&lt;KEY&gt;" in configuration
    cli = (site / "cli" / "index.html").read_text()
    assert "usage: caplance ctl drain [-h] [--timeout TIMEOUT] NAME" in cli
    api = (site / "api" / "library" / "index.html").read_text()
    assert 'id="caplance.balancer.Balancer.run"' in api
    assert ":class:`" not in api  # the griffe extension turned reST roles into code


def api_section(page: str, path: str) -> str:
    """The HTML of one object's entry on an API page: from its heading to the next heading
    of an object that is not one of its members."""
    start = page.index(f'id="{path}"')
    following = re.compile(r'id="(caplance\.[\w.]+)"').finditer(page, start + 1)
    end = next((m.start() for m in following if not m.group(1).startswith(path + ".")), len(page))
    return page[start:end]


def text_of(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


CONFIG_CLASSES = [BalancerConfig, VipConfig, BackendConfig, PluginConfig, HealthCheckConfig, ListenerConfig,
                  ConntrackConfig, FastpathConfig, AnnounceConfig, DecapConfig, AgentConfig, LocalCheckConfig]


@needs_mkdocs
@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda cls: cls.__name__)
def test_the_api_reference_shows_each_config_field(site: Path, cls: type) -> None:
    """docs/griffe_attrs.py: every field with its type and doc text, and the constructor's
    parameters in the class's signature -- not one line per class."""
    page = (site / "api" / "library" / "index.html").read_text()
    section = api_section(page, f"caplance.config.{cls.__name__}")
    signature = text_of(section[:section.index("</code>")])
    assert "attrs.field" not in text_of(section)
    for field in attrs.fields(cls):
        entry = text_of(api_section(page, f"caplance.config.{cls.__name__}.{field.name}"))
        assert f"{field.name}: " in entry, (cls.__name__, field.name)  # annotated
        assert field.metadata["doc"] in entry, (cls.__name__, field.name)
        assert re.search(rf"[(\s]{field.name}: ", signature), (cls.__name__, field.name)


@needs_mkdocs
def test_the_api_reference_shows_defaults_and_formats_signatures(site: Path) -> None:
    page = (site / "api" / "library" / "index.html").read_text()
    vip = text_of(api_section(page, "caplance.config.VipConfig"))
    assert "ports: tuple[Port, ...] = ()" in vip
    assert "consistent-hash selector and its options" in vip
    assert 'selector: PluginConfig = PluginConfig(name="maglev")' in vip  # a factory's product
    # ruff (the docs extra) formats signatures: one parameter a line once they are long
    balancer = text_of(api_section(page, "caplance.balancer.Balancer"))
    assert "Balancer(\n    config: BalancerConfig,\n    *,\n    listener: Listener | None = None," in balancer


@needs_mkdocs
@pytest.mark.parametrize("path", [
    # the composition's plumbing: used by Balancer, the agent sessions, health checks and ctl
    "caplance.control.plane.ControlPlane.add_member", "caplance.control.plane.ControlPlane.add_consumer",
    "caplance.control.plane.ControlPlane.set_forwarding", "caplance.control.plane.ControlPlane.stop_admitting",
    "caplance.control.plane.ControlPlane.transport", "caplance.control.plane.ControlPlane.sessions",
    "caplance.control.plane.ControlPlane.switches", "caplance.agent.Agent.registrations",
    "caplance.forwarding.TableLog", "caplance.forwarding.BackendIds",
])
def test_the_api_reference_leaves_out_internals(site: Path, path: str) -> None:
    page = (site / "api" / "library" / "index.html").read_text()
    assert f'id="{path}"' not in page
    owner = path.rsplit(".", 1)[0]
    assert f'id="{owner}"' in page  # the object itself is still there


def test_every_config_field_is_in_the_reference() -> None:
    for root, cls in hooks.ROOTS.items():
        text = hooks.config_reference(root)
        for _, table_cls, _ in hooks.rows(cls):
            for field in attrs.fields(table_cls):
                assert f"| `{field.name}` |" in text, (root, table_cls.__name__, field.name)
                doc = field.metadata.get("doc")
                assert doc, f"{table_cls.__name__}.{field.name} has no doc metadata for the reference"


def test_the_reference_shows_defaults_and_requirements() -> None:
    text = hooks.config_reference("balancer")
    assert "| `vips` | list of [VipConfig](#balancer-vipconfig) tables | **required** |" in text
    assert '| `control_socket` | string | `"/run/caplance/balancer.sock"` |' in text
    assert "| `drain_timeout` | seconds (number > 0) | `10.0` |" in text
    assert '| `kind` | "tcp" / "http" | `"tcp"` |' in text
    assert '| `kind` | name (1-64 printable characters) | `"tun"` |' in text


@pytest.mark.parametrize("root", ["balancer", "agent"])
def test_every_documented_variable_is_one_the_loader_takes(root: str) -> None:
    cls = hooks.ROOTS[root]
    data = MINIMAL if root == "balancer" else {"name": "be1", "vips": ["10.99.0.1"]}
    variables = hooks.env_variables(root)
    assert len(variables) > 20
    for variable, _, _ in variables:
        name = variable.replace("<N>", "0").replace("<KEY>", "x")
        if name == "CAPLANCE_SECRET":
            continue
        apply_environment(data, {name: "1"}, cls=cls)  # raises ConfigError for a path that does not fit


def test_the_variable_table_is_complete() -> None:
    paths = {path for _, path, _ in hooks.env_variables("balancer")}
    assert {"drain_timeout", "listener.kind", "vips[<N>].ports", "vips[<N>].ports[<N>]",
            "vips[<N>].backends[<N>].transport.options", "vips[<N>].selector.options.<key>",
            "vips[<N>].health.rise", "conntrack.max_flows", "secret"} <= paths


def test_the_cli_reference_covers_every_command() -> None:
    text = hooks.cli_reference()
    for command in ["caplance", "caplance balancer", "caplance agent", "caplance ctl", "caplance ctl status",
                    "caplance ctl pause", "caplance ctl resume", "caplance ctl drain", "caplance ctl deregister",
                    "caplance config", "caplance config check", "caplance config show"]:
        assert f"`{command}`" in text, command
    assert build_parser().format_help().splitlines()[0] in text


def test_an_unknown_marker_fails_the_build() -> None:
    assert hooks.expand("a\n<!-- generated: cli -->\nb").startswith("a\n## `caplance`")
    with pytest.raises(ValueError, match="unknown generated block: config router"):
        hooks.expand("<!-- generated: config router -->")


# -- figures come from the bench output ---------------------------------------------------

FIGURES = {"forward": {"tc_delivered": {"value": 0.9876, "command": "python bench/forward.py --record f",
                                        "measured": "2026-12-02, 2 CPUs"}}}


def test_a_figure_is_quoted_from_the_bench_output() -> None:
    quoted = hooks.quote_figures("tc: [[figure forward.tc_delivered .2f]]x, raw [[figure forward.tc_delivered]]; "
                                 "[[measured forward.tc_delivered]]", FIGURES)
    assert quoted == "tc: 0.99x, raw 0.9876; 2026-12-02, 2 CPUs: `python bench/forward.py --record f`"


@pytest.mark.parametrize("text", ["[[figure forward.xdp_delivered]]", "[[figure selectors.tc_delivered]]",
                                  "[[measured forward.nothing]]"])
def test_an_unknown_figure_fails_the_build(text: str) -> None:
    with pytest.raises(ValueError, match=r"unknown figure .*run the bench script with --record"):
        hooks.quote_figures(text, FIGURES)


def test_every_quoted_figure_is_in_the_bench_output() -> None:
    recorded = hooks.load_figures()
    quoted = hooks.figures_quoted_by_pages()
    assert set(quoted) >= {"forward", "selectors", "rebuild", "http"}  # the pages do quote them
    for section, names in quoted.items():
        missing = names - set(recorded.get(section, {}))
        assert not missing, f"{section}: {sorted(missing)} not in docs/figures.toml"
        for name in names:
            figure = recorded[section][name]
            assert isinstance(figure["value"], int | float)
            assert figure["command"].startswith("python bench/") and "--record" in figure["command"]


def test_every_page_has_its_figures_filled_in() -> None:
    """No ``[[figure`` or ``[[measured`` left on a page after the hooks ran (a misspelt one
    the pattern does not take would otherwise show raw)."""
    for page in DOCS.rglob("*.md"):
        quoted = hooks.quote_figures(page.read_text(), hooks.load_figures())
        assert "[[figure" not in quoted and "[[measured" not in quoted, page


def test_each_table_compares_figures_of_one_run() -> None:
    """Figures a table sets side by side -- the same measure of different rows, such as
    ``python_delivered``, ``tc_delivered`` and ``xdp_delivered`` -- come from one run of one
    command, as the ratios they compare must: a run that measured only some rows must not leave
    an older run's rows beside them."""
    recorded = hooks.load_figures()
    for page in DOCS.rglob("*.md"):
        for table in re.findall(r"(?:^\|.*\n)+", page.read_text(), flags=re.MULTILINE):
            measures: dict[str, set[tuple[str, str]]] = {}
            for section, name in hooks.quoted_figures(table):
                figure = recorded[section][name]
                measure = f"{section}.{name.partition('_')[2]}"  # python_delivered -> forward.delivered
                measures.setdefault(measure, set()).add((figure["command"], figure["measured"]))
            for measure, runs in measures.items():
                assert len(runs) == 1, f"{page.relative_to(DOCS)}: {measure} from {sorted(runs)}"


_BARE_FIGURE = re.compile(r"(?<![\w.-])\d[\d,]*(?:\.\d+)? ?(?:x|ms|µs|ns|%|Gbit/s|MB|bytes per flow|packets/s)(?![\w-])")
#: figures no bench script measures, page by page
_NOT_FROM_BENCH = {
    "index.md": {"0.41x", "0.89x", "0.31x"},  # HAProxy, kernel, Python: a review's wrk run
    "components/balancer.md": {"4.9 µs", "7 µs"},  # trio's checkpoint and wait, timed by hand
    "benchmarks.md": {"15%",  # the flow table's bound
                      "100 x",  # the table_size rule
                      "1%",  # sampling noise, sqrt(n)/n per backend
                      "50 ms"},  # a full collection, observed while writing rebuild_stall.py
    "components/selectors.md": {"100 x"},
    "sizing.md": {"31 MB"},  # the kernel's flow map: computed from its structures, not measured
}


def test_no_page_quotes_a_bench_figure_by_hand() -> None:
    """A number in the form the bench figures take (0.49x, 6.6 µs, 134 ms, 177 bytes per
    flow...) written into a page by hand would not follow a new measurement: the pages quote
    them as ``[[figure ...]]``. Code (examples, output) aside; the exceptions are named above."""
    for page in DOCS.rglob("*.md"):
        text = hooks.FIGURE.sub("", page.read_text())
        text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
        text = re.sub(r"`[^`\n]*`", "", text)
        allowed = _NOT_FROM_BENCH.get(str(page.relative_to(DOCS)), set())
        bare = [m for m in _BARE_FIGURE.findall(text) if m not in allowed]
        assert not bare, f"{page.relative_to(DOCS)} quotes {bare} by hand: record it and use [[figure ...]]"


def test_the_by_hand_check_catches_what_it_should() -> None:
    for text in ("took 134 ms", "0.49x of", "about 7 µs", "177 bytes per flow", "1,200 packets/s"):
        assert _BARE_FIGURE.findall(text), text
    for text in ("be1=5", "10.99.0.1", "[[figure forward.tc_delivered .2f]]x"):
        assert not _BARE_FIGURE.findall(hooks.FIGURE.sub("", text)), text


def test_markers_inside_admonitions_keep_their_indentation() -> None:
    expanded = hooks.expand("??? note\n\n    <!-- generated: env agent -->\n")
    assert "\n    | variable | key | value |\n" in expanded


# -- the site works with no network -------------------------------------------------------

#: ``<link rel=...>`` kinds the browser fetches (or connects for) when the page loads.
_FETCHED_LINKS = {"stylesheet", "preload", "modulepreload", "prefetch", "preconnect",
                  "dns-prefetch", "icon", "apple-touch-icon", "manifest"}
_CSS_URL = re.compile(r"""@import\s+(?:url\()?\s*["']?([^"')\s;]+)|url\(\s*["']?([^"')\s]+)""")


class _Loads(HTMLParser):
    """What an HTML page loads at view time: (what, URL) pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[tuple[str, str]] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {name: value or "" for name, value in attrs}
        rel = set(attr.get("rel", "").lower().split())
        if tag == "script" and "src" in attr:
            self.loads.append(("script", attr["src"]))
        elif tag == "link" and rel & _FETCHED_LINKS:
            self.loads.append((f"link rel={'/'.join(sorted(rel))}", attr.get("href", "")))
        elif tag in ("img", "source", "iframe", "video", "audio", "embed"):
            for name in ("src", "poster"):
                if name in attr:
                    self.loads.append((tag, attr[name]))
            for candidate in attr.get("srcset", "").split(","):
                if candidate.strip():
                    self.loads.append((f"{tag} srcset", candidate.split()[0]))
        elif tag == "object" and "data" in attr:
            self.loads.append((tag, attr["data"]))
        if tag == "style":
            self._in_style = True
        self._css("style attribute", attr.get("style", ""))

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self._css("inline <style>", data)

    def _css(self, what: str, css: str) -> None:
        for match in _CSS_URL.finditer(css):
            self.loads.append((what, match.group(1) or match.group(2)))


def _foreign(url: str, own_host: str) -> bool:
    parts = urlsplit(url.strip())
    # "https://x/a" and "//x/a" name a host; "a/b", "../a" and "data:..." do not
    return bool(parts.netloc) and parts.netloc != own_host


@needs_mkdocs
def test_no_page_loads_anything_from_another_host(site: Path) -> None:
    """An offline or air-gapped reader gets the whole site: no script, stylesheet, font or
    image comes from a CDN (Material's Google Fonts, Mermaid from unpkg) at view time. Links
    to other sites are fine."""
    own_host = urlsplit(os.environ.get("CAPLANCE_SITE_URL", "")).netloc
    foreign = []
    for page in sorted(site.rglob("*.html")):
        parser = _Loads()
        parser.feed(page.read_text())
        foreign += [f"{page.relative_to(site)}: {what} {url}"
                    for what, url in parser.loads if _foreign(url, own_host)]
    for sheet in sorted(site.rglob("*.css")):
        foreign += [f"{sheet.relative_to(site)}: {url}"
                    for match in _CSS_URL.finditer(sheet.read_text())
                    for url in [match.group(1) or match.group(2)] if _foreign(url, own_host)]
    assert not foreign, "the site loads from other hosts:\n" + "\n".join(foreign[:40])


@needs_mkdocs
def test_pages_with_diagrams_load_the_bundled_mermaid(site: Path) -> None:
    """Material fetches Mermaid from unpkg.com unless the page has defined ``window.mermaid``
    by then: every page with a diagram loads the copy the build bundled, and that copy
    defines it."""
    bundled = site / hooks.MERMAID_SCRIPT
    assert 'globalThis["mermaid"]' in bundled.read_text()[-500:], "not the build for <script>"
    pages = [page for page in sorted(site.rglob("*.html")) if 'class="mermaid"' in page.read_text()]
    assert len(pages) >= 2
    for page in pages:
        parser = _Loads()
        parser.feed(page.read_text())
        scripts = [(page.parent / url).resolve() for what, url in parser.loads if what == "script"]
        assert bundled.resolve() in scripts, f"{page.relative_to(site)}: no {hooks.MERMAID_SCRIPT}"


def mermaid_diagrams() -> list[tuple[str, int, str]]:
    """Every ```mermaid block of the docs: (page, line, text)."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        for match in re.finditer(r"^( *)```mermaid\n(.*?)^\1```", text, re.MULTILINE | re.DOTALL):
            found.append((str(page.relative_to(DOCS)), text.count("\n", 0, match.start()) + 1,
                          textwrap.dedent(match.group(2))))
    return found


#: Parses each diagram of a JSON list on stdin with the bundled Mermaid; prints one error
#: message (or null) per diagram. Mermaid sanitizes labels with DOMPurify, which needs a
#: window: jsdom's, made global before Mermaid (and DOMPurify in it) is imported.
_PARSE_DIAGRAMS = """
import { readFileSync } from "node:fs";
import { JSDOM } from "jsdom";
globalThis.window = new JSDOM("").window;
const { default: mermaid } = await import("mermaid");
const results = [];
for (const text of JSON.parse(readFileSync(0, "utf8"))) {
  try { await mermaid.parse(text); results.push(null); }
  catch (error) { results.push(String(error && error.message || error)); }
}
console.log(JSON.stringify(results));
"""


def test_every_diagram_parses() -> None:
    """What the browser would do with each diagram, in one node process over the Mermaid the
    site bundles: a diagram Mermaid cannot parse shows as raw text."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (make setup installs Debian's nodejs)")
    assert (hooks.NPM_DIR / "node_modules" / "mermaid").is_dir(), \
        f"Mermaid is not installed in {hooks.NPM_DIR} (`make npm`, part of `make setup`)"
    diagrams = mermaid_diagrams()
    assert len(diagrams) >= 3
    done = subprocess.run([node, "--input-type=module", "-e", _PARSE_DIAGRAMS], cwd=hooks.NPM_DIR,
                          input=json.dumps([text for _, _, text in diagrams]),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = [f"docs/{page}:{line}: {error}" for (page, line, _), error
              in zip(diagrams, json.loads(done.stdout.splitlines()[-1]), strict=True) if error]
    assert not errors, "Mermaid cannot parse:\n" + "\n\n".join(errors)


# -- what the pages show is what the code does ---------------------------------------------


def toml_blocks() -> list[tuple[str, int, str]]:
    """Every ```toml block of the docs that is a whole config file (not a ``# (fragment)``,
    not an included file)."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        for match in re.finditer(r"^ *```toml\n(.*?)^ *```", text, re.MULTILINE | re.DOTALL):
            body = match.group(1)
            if body.startswith("# (fragment)") or "--8<--" in body:
                continue
            found.append((str(page.relative_to(DOCS)), text.count("\n", 0, match.start()) + 1, body))
    return found


def test_the_docs_have_config_examples() -> None:
    assert len(toml_blocks()) >= 6


@pytest.mark.parametrize(("page", "line", "body"), toml_blocks(),
                         ids=[f"{page}:{line}" for page, line, _ in toml_blocks()])
def test_every_config_example_is_valid(page: str, line: int, body: str, example_plugin: Any) -> None:  # noqa: F811
    data = tomllib.loads(body)
    cls = AgentConfig if "name" in data else BalancerConfig
    config = structure(data, cls)
    assert plugins.check_plugins(config) == []
    # as the loader would check it, with a secret from secret_file or CAPLANCE_SECRET
    assert control_security(attrs.evolve(config, secret=Secret(b"a placeholder secret, 32 bytes.."))) == []


def drop_reasons(module: str) -> set[str]:
    source = (ROOT / "caplance" / module).read_text()
    return set(re.findall(r'dropped\["([a-z_]+)"\]', source)) | (
        {"malformed_<reason>"} if 'dropped["malformed_" +' in source else set())


@pytest.mark.parametrize("module", ["dataplane/python.py", "agent/__init__.py", "listeners/nfqueue.py"])
def test_every_drop_reason_is_explained(module: str) -> None:
    troubleshooting = (DOCS / "troubleshooting.md").read_text()
    reasons = drop_reasons(module)
    assert reasons & {"not_a_vip", "not_our_vip", "nfqueue_truncated"}  # the pattern still matches the code
    missing = sorted(reason for reason in reasons if f"`{reason}`" not in troubleshooting)
    assert not missing, f"docs/troubleshooting.md does not explain the drop counter(s) {missing}"
