"""visualize: DOT/SVG/PNG diagrams, repeated-block collapse, channel-group tables, report, export."""

from __future__ import annotations

import re
import runpy
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from types import SimpleNamespace

import networkx as nx
import numpy as np
import pydot
import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import depgraph
import visualize
from visualize.collapse import find_runs
from visualize.style import CUT_TINT, HEAT, KIND_COLOR, WARN_TINT, ranges

HAS_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="Graphviz `dot` not installed (apt-get install graphviz)")
ROOT = Path(__file__).resolve().parents[1]


def llama_config(layers: int = 2) -> LlamaConfig:
    # head_dim 16, 4 query heads sharing 2 KV heads: one B unit = 32 q rows + 16 k/v rows
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128)


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    return depgraph.trace(LlamaForCausalLM(llama_config()).eval())


@pytest.fixture(scope="module")
def overlays(graph):
    gen = torch.Generator().manual_seed(0)
    scores = {g: torch.rand(g.size, generator=gen) for g in graph.groups()}
    plan = {g: list(range(0, g.size, 4)) for g in graph.groups("A")}
    plan[graph.groups("B")[0]] = [1]
    return scores, plan


# ---- helpers ----------------------------------------------------------------------------------
def walk(g: pydot.Graph):
    """(graph, nodes, edges, subgraphs) of ``g`` and every subgraph below it."""
    yield g
    for sg in g.get_subgraphs():
        yield from walk(sg)


def real_nodes(g: pydot.Graph) -> list[pydot.Node]:
    return [n for sg in walk(g) for n in sg.get_nodes() if n.get_name() not in ("node", "edge", "graph")]


def clusters(g: pydot.Graph) -> dict[str, pydot.Subgraph]:
    return {sg.get_name().strip('"'): sg for sg in walk(g) if sg is not g}


def parse(dot: pydot.Dot) -> pydot.Dot:
    parsed = pydot.graph_from_dot_data(dot.to_string())
    assert parsed, "DOT did not parse"
    return parsed[0]


def label_xml(node: pydot.Node) -> ET.Element:
    """The HTML-like label of ``node`` as an XML element (it must be well-formed)."""
    label = node.get_label()
    assert label.startswith("<") and label.endswith(">")
    return ET.fromstring(label[1:-1])


def table_rows(table: ET.Element) -> list[list[str]]:
    return [["".join(td.itertext()).strip() for td in tr.findall("TD")] for tr in table.findall("TR")]


def png_pixels_vary(data: bytes) -> bool:
    """Decode an 8-bit PNG with zlib and report whether any two pixels differ."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if ctype == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif ctype == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and interlace == 0, "test decoder handles 8-bit non-interlaced PNGs"
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = np.zeros(stride, dtype=np.int32)
    first = None
    for y in range(height):
        f = raw[y * (stride + 1)]
        row = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int32)
        if f == 1:
            row = np.cumsum(row.reshape(-1, bpp), axis=0).reshape(-1) % 256
        elif f == 2:
            row = (row + prev) % 256
        elif f in (3, 4):  # Average / Paeth depend on the pixel just decoded: byte by byte
            out = row.copy()
            for i in range(stride):
                a = out[i - bpp] if i >= bpp else 0
                b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
                if f == 3:
                    out[i] = (row[i] + (a + b) // 2) % 256
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                    out[i] = (row[i] + pred) % 256
            row = out
        px = row.reshape(-1, bpp)
        if first is None:
            first = px[0].copy()
        if (px != first).any():
            return True
        prev = row
    return False


# ---- module view -------------------------------------------------------------------------------
def test_dot_parses_with_module_clusters_and_kind_colours(graph, tmp_path):
    path = visualize.render(graph, tmp_path / "llama.dot")
    parsed = pydot.graph_from_dot_data(path.read_text())[0]
    names = clusters(parsed)
    block = names["cluster_c_model_layers_0"]
    assert "\u00d72" in block.get_label()  # the repeated block is drawn once, with its count
    assert {"cluster_c_model_layers_0_self_attn", "cluster_c_model_layers_0_mlp", "cluster_legend"} <= set(names)
    ids = {n.get_name() for n in real_nodes(parsed)}
    assert not any("layers_1" in i for i in ids), "layer 1 must be folded into layer 0"
    edges = {(e.get_source(), e.get_destination()): e for sg in walk(parsed) for e in sg.get_edges()}

    def colour(a: str, b: str) -> str:
        return edges[(f"u_{a}", f"u_{b}")].get("color").strip('"')

    assert colour("model_layers_0_mlp_gate_proj", "model_layers_0_mlp_down_proj") == KIND_COLOR["A"]
    assert colour("model_layers_0_self_attn_k_proj", "model_layers_0_self_attn_attention_0") == KIND_COLOR["B"]
    assert colour("model_layers_0_self_attn_attention_0", "model_layers_0_self_attn_o_proj") == KIND_COLOR["B"]
    assert colour("model_layers_0_input_layernorm", "model_layers_0_self_attn_q_proj") == KIND_COLOR["C"]
    assert colour("model_norm", "lm_head") == KIND_COLOR["C"]
    back = edges[("u_model_layers_0_mlp_down_proj", "u_model_layers_0_input_layernorm")]
    assert "dashed" in back.get("style") and "\u00d72" in back.get("label")
    assert {e.get("color").strip('"') for e in parsed.get_edges()} == {KIND_COLOR[k] for k in "ABC"}
    # frozen dims are marked: embedding rows and the output head's vocabulary rows
    lm_head = label_xml(next(n for n in real_nodes(parsed) if n.get_name() == "u_lm_head"))
    assert "frozen" in "".join(lm_head.itertext())


@needs_dot
def test_svg_png_pdf_files_are_valid(graph, tmp_path):
    svg = visualize.render(graph, tmp_path / "llama.svg")
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg") and svg.stat().st_size > 1000
    png = visualize.render(graph, tmp_path / "block.png", scope="model.layers.0", level="neuron")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and png_pixels_vary(data)
    pdf = visualize.render(graph, tmp_path / "llama.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    with pytest.raises(ValueError, match="format"):
        visualize.render(graph, tmp_path / "llama.jpeg")


def test_collapsed_view_does_not_grow_with_depth():
    counts = []
    for layers in (4, 32):
        with torch.device("meta"):
            model = LlamaForCausalLM(llama_config(layers))
        g = depgraph.trace(model)
        module = parse(visualize.build(g))
        neuron = parse(visualize.build(g, level="neuron"))
        counts.append((len(real_nodes(module)), len(module.get_edges()), len(real_nodes(neuron))))
        if layers == 4:
            flat = visualize.build(g, collapse=False)
            assert len(real_nodes(flat)) > len(real_nodes(module))
            runs = find_runs(g).runs
            assert [(r.prefix, r.indices) for r in runs] == [("model.layers", (0, 1, 2, 3))]
    assert counts[0] == counts[1]


def test_find_runs_splits_blocks_that_differ():
    # layers 0-1 and 3-4 share a structure, layer 2 differs: two runs, layer 2 drawn on its own
    shapes = {}
    for i, leaf in enumerate(["a", "a", "b", "c", "c"]):
        shapes[f"layers.{i}.{leaf}.weight"] = (4, 4)
    fake = SimpleNamespace(param_shapes=shapes, groups=lambda kind=None: [], frozen={}, unknown_ops=[])
    runs = find_runs(fake)
    assert [r.indices for r in runs.runs] == [(0, 1), (3, 4)]
    assert runs.canonical("layers.4.c.weight") == "layers.3.c.weight"
    assert runs.canonical("layers.2.b.weight") == "layers.2.b.weight"


# ---- channel-group view --------------------------------------------------------------------------
def test_scoped_view_lists_exact_coupled_slices(graph):
    dot = parse(visualize.build(graph, scope="model.layers.0", level="neuron"))
    tables = {}
    for node in real_nodes(dot):
        if node.get_name().startswith("g_"):
            table = label_xml(node)
            tables[node.get_name()] = table_rows(table)
    b = tables["g_model_layers_0_self_attn"]
    rows = {r[0]: r for r in b[2:] if r and r[0].endswith(".weight")}
    head = b[1]
    u0, u1 = head.index("unit 0"), head.index("unit 1")
    assert rows["self_attn.q_proj.weight"][1] == "rows"
    assert (rows["self_attn.q_proj.weight"][u0], rows["self_attn.q_proj.weight"][u1]) == ("0-31", "32-63")
    assert (rows["self_attn.k_proj.weight"][u0], rows["self_attn.k_proj.weight"][u1]) == ("0-15", "16-31")
    assert rows["self_attn.o_proj.weight"][1:3] == ["cols", "in"]
    # the table says exactly what trigger propagation from q_proj row 0 reaches
    coupled = graph.coupled("model.layers.0.self_attn.q_proj.weight", 0, dim=0)
    for param, col in (("q_proj", "rows"), ("k_proj", "rows"), ("v_proj", "rows"), ("o_proj", "cols")):
        key = (f"model.layers.0.self_attn.{param}.weight", 0 if col == "rows" else 1)
        assert rows[f"self_attn.{param}.weight"][u0] == ranges(coupled[key])
    a = tables["g_model_layers_0_mlp"]
    assert {r[0] for r in a[2:] if r and r[0].startswith("mlp.")} == {
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
    assert "g_model_layers_1_mlp" not in tables  # the scope holds one block
    other = parse(visualize.build(graph, scope="model.layers.1", level="neuron"))  # a later block: itself
    assert {"g_model_layers_1_self_attn", "g_model_layers_1_mlp"} <= {n.get_name() for n in real_nodes(other)}
    # the hidden group is bounded to the scope and says how much it left out
    c = tables["g_hidden"]
    assert any("members outside model.layers.0" in " ".join(r) for r in c)
    assert len(c[1]) == 4 + 4 + 1  # parameter/dim/role/per-unit, 4 units, "+60"


def test_overlays_heat_and_plan(graph, overlays):
    scores, plan = overlays
    dot = parse(visualize.build(graph, scope="model.layers.0", level="neuron", scores=scores, plan=plan))
    b_label = next(n for n in real_nodes(dot) if n.get_name() == "g_model_layers_0_self_attn").get_label()
    assert "<S>unit 1</S>" in b_label and CUT_TINT in b_label and "2&#8594;1 units" in b_label
    assert "score min" in b_label
    heats = {n.get_name(): label_xml(n).find("TR/TD").get("BGCOLOR") for n in real_nodes(dot)
             if n.get_name().startswith("g_")}
    assert set(heats.values()) <= set(HEAT)  # group headers take their heat colour
    module = visualize.build(graph, scores=scores, plan=plan).to_string()
    assert "128\u2192" in module or "128&#8594;" in module  # gate/up rows: before -> after
    with pytest.raises(ValueError, match="units"):
        visualize.build(graph, scores={graph.groups("A")[0]: torch.zeros(3)})
    with pytest.raises(ValueError, match="outside"):
        visualize.build(graph, plan={graph.groups("B")[0]: [5]})


@needs_dot
def test_groups_view_of_selected_groups(graph, overlays, tmp_path):
    scores, _ = overlays
    path = visualize.render(graph, tmp_path / "groups.svg", groups=graph.groups("B"), scores=scores)
    ET.parse(path)
    dot = parse(visualize.build(graph, groups=graph.groups("B"), scores=scores))
    tables = sorted(n.get_name() for n in real_nodes(dot) if n.get_name().startswith("g_"))
    assert tables == ["g_model_layers_0_self_attn", "g_model_layers_1_self_attn"]


def test_unknown_ops_are_highlighted():
    class Rolled(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
            self.fc1, self.fc2 = nn.Linear(16, 24), nn.Linear(24, 16)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(self.down(torch.roll(self.up(x), 1, -1)))))

    g = depgraph.trace(Rolled(), torch.randn(2, 16))
    assert g.warnings
    dot = parse(visualize.build(g))
    notes = [n for n in real_nodes(dot) if n.get_name().startswith("w_")]
    assert notes and "aten.roll" in notes[0].get_label()
    up = next(n for n in real_nodes(dot) if n.get_name() == "u_up")
    assert WARN_TINT in up.get_label()
    fc1 = next(n for n in real_nodes(dot) if n.get_name() == "u_fc1")
    assert WARN_TINT not in fc1.get_label()


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_other_families_draw_their_flow(family):
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100, n_positions=32))
        chain = [("transformer_h_0_attn_c_attn", "transformer_h_0_attn_attention_0", "B"),
                 ("transformer_h_0_attn_attention_0", "transformer_h_0_attn_c_proj", "B"),
                 ("transformer_h_0_mlp_c_fc", "transformer_h_0_mlp_c_proj", "A"),
                 ("transformer_h_0_ln_1", "transformer_h_0_attn_c_attn", "C")]
    else:
        cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=100, max_position_embeddings=32)
        cfg._attn_implementation = "eager"
        model = BertForMaskedLM(cfg)
        chain = [("bert_embeddings_LayerNorm", "bert_encoder_layer_0_attention_self_query", "C"),
                 ("bert_encoder_layer_0_intermediate_dense", "bert_encoder_layer_0_output_dense", "A")]
    dot = parse(visualize.build(depgraph.trace(model.eval())))
    edges = {(e.get_source(), e.get_destination()): e.get("color").strip('"') for e in dot.get_edges()}
    for a, b, kind in chain:
        assert edges.get((f"u_{a}", f"u_{b}")) == KIND_COLOR[kind], (a, b)


# ---- Graphviz missing ----------------------------------------------------------------------------
def test_missing_dot_gives_clear_error(graph, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert shutil.which("dot") is None
    assert visualize.render(graph, tmp_path / "ok.dot").read_text().startswith("digraph")
    with pytest.raises(visualize.GraphvizNotFound) as err:
        visualize.render(graph, tmp_path / "no.svg")
    assert isinstance(err.value, depgraph.DepGraphError)
    assert "apt-get install graphviz" in str(err.value) and "brew install graphviz" in str(err.value)
    assert not (tmp_path / "no.svg").exists()
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    html = visualize.report(graph, tmp_path / "report.html").read_text()
    assert "was not found" in html and "<svg" not in html and "model.layers.0.mlp" in html


# ---- report ----------------------------------------------------------------------------------------
@needs_dot
def test_report_is_self_contained_and_renders(graph, overlays, tmp_path):
    scores, plan = overlays
    path = visualize.report(graph, tmp_path / "report.html", scores=scores, plan=plan, title="tiny llama")
    html = path.read_text(encoding="utf-8")
    assert html.count("<svg") == 2  # whole model + first block
    for text in ("LlamaForCausalLM", "model.layers.0.self_attn", "score min", "units cut", "tiny llama",
                 "type B groups"):
        assert text in html, text
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?\s*(https?:[^"'\s>]*)""", html, flags=re.I)
    assert refs == [], refs
    assert "<script" not in html.lower() and "<link" not in html.lower() and "url(" not in html
    assert "DOCTYPE svg" not in html and "<?xml" not in html
    for url in re.findall(r"https?://[^\s\"'<>]+", html):  # only XML namespace names remain
        assert url in ("http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"), url

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed: cannot check that the report opens (apt-get install chromium)")
    shot = tmp_path / "shot.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
           path.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.exists() and shot.stat().st_size > 5000
    assert png_pixels_vary(shot.read_bytes()), "the report rendered as a blank page"


# ---- export ----------------------------------------------------------------------------------------
def test_graphml_and_json_round_trip(graph, tmp_path):
    for write, read, name in ((visualize.to_graphml, visualize.from_graphml, "g.graphml"),
                              (visualize.to_json, visualize.from_json, "g.json")):
        back = read(write(graph, tmp_path / name))
        assert isinstance(back, nx.DiGraph)
        assert set(back.nodes) == set(graph.nx.nodes) and set(back.edges) == set(graph.nx.edges)
        for n, data in graph.nx.nodes(data=True):
            assert dict(back.nodes[n]) == data, n
        for a, b, data in graph.nx.edges(data=True):
            assert dict(back.edges[a, b]) == data
        assert back.graph["model"] == "LlamaForCausalLM" and back.graph["groups_B"] == 2


def test_export_makes_attributes_graphml_legal(tmp_path):
    g = nx.DiGraph()
    g.add_node("a", size=np.int64(3), scale=np.float32(0.5), ok=np.bool_(True), shape=(2, 3), none=None)
    g.add_node("b", size=4, mixed=1)
    g.add_node("c", mixed="x")
    g.add_edge("a", "b", w=np.float64(1.5))
    back = visualize.from_graphml(visualize.to_graphml(g, tmp_path / "x.graphml"))
    assert back.nodes["a"] == {"size": 3, "scale": 0.5, "ok": True, "shape": "(2, 3)", "none": ""}
    assert back.nodes["b"]["mixed"] == "1" and back.nodes["c"]["mixed"] == "x"
    assert back.edges["a", "b"]["w"] == 1.5
    assert visualize.from_json(visualize.to_json(g, tmp_path / "x.json")).nodes["a"]["size"] == 3


# ---- small pieces ----------------------------------------------------------------------------------
def test_ranges_compress_index_lists():
    assert ranges([*range(16), *range(32, 48)]) == "0-15, 32-47"
    assert ranges([5]) == "5"
    assert ranges(range(0, 20, 2), limit=3) == "0, 2, 4, \u2026"


def test_scope_errors_name_the_choices(graph):
    with pytest.raises(ValueError, match="model.layers.0"):
        visualize.build(graph, scope="model.nothing")
    with pytest.raises(ValueError, match="level"):
        visualize.build(graph, level="pixel")


@needs_dot
def test_example_script_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["render_diagram.py", str(tmp_path)])
    runpy.run_path(str(ROOT / "examples" / "render_diagram.py"), run_name="__main__")
    printed = capsys.readouterr().out
    for name in ("llama.svg", "block0.svg", "report.html"):
        assert (tmp_path / name).exists() and name in printed
