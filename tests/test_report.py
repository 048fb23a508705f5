"""Direct tests of ``report.write_report`` on hand-written manifests, read back with ``html.parser``."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from urllib.parse import quote, unquote, urlparse

import pytest

from vizdeconv import report

TRICKY = 'x&y"<z>'  # a file name with every HTML special character
LABEL = "layer 5 (features.11) </script><script>alert(1)</script>"
DATA = re.compile(r'<script type="application/json" id="data">(.*?)</script', re.S | re.I)


class Page(HTMLParser):
    """Sections (id → attributes), and every element's attributes and text, by the section it is in."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.sections, self.tags, self.text = {}, [], {}
        self.section = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section = attrs["id"]
            self.sections[self.section] = attrs
        self.tags.append((self.section, tag, attrs))

    def handle_endtag(self, tag):
        if tag == "section":
            self.section = None

    def handle_data(self, data):
        self.text.setdefault(self.section, []).append(data)

    def elements(self, tag, section=...):
        return [attrs for where, name, attrs in self.tags if name == tag and section in (..., where)]

    def section_text(self, section) -> str:
        return "".join(self.text.get(section, []))


def _hit(image, channel, value, position=(3, 4), box=(0, 0, 28, 28), clipped=True) -> dict:
    return {"image": str(image), "channel": channel, "value": value, "position": list(position), "box": list(box),
            "clipped": clipped}


def _project(label, channels, *, layer=5, overview=("overview.png",), failed=()) -> dict:
    """A manifest shaped like ``ProjectJob._write``'s."""
    return {"kind": "project", "model": "embedded", "weights": "shipped", "layer": layer, "module": "features.11",
            "label": label, "rule": "deconvnet", "input_size": [1, 28, 28], "k": 9,
            "receptive_field": {"size": [39, 39], "stride": [4, 4], "offset": [-19, -19]},
            "images_scanned": 20, "failed": list(failed), "display": "…", "overview": list(overview),
            "channels": channels}


@pytest.fixture
def run(tmp_path):
    """Manifests of every kind under ``out``, input images beside it, and the page written from them."""
    out, images = tmp_path / "out", tmp_path / "images"
    images.mkdir()
    present, tricky = images / "a.png", images / f"{TRICKY}.png"
    present.write_bytes(b"png")
    tricky.write_bytes(b"png")
    missing = images / "gone.png"
    script_name = "/data/</script><script>alert(2)</script>.png"
    layer5 = _project(LABEL, [
        {"channel": 3, "png": "ch003.png",
         "hits": [_hit(present, 3, 4.25), _hit(missing, 3, 2.0, (0, 1), (0, 0, 20, 21), True)]},
        {"channel": 12, "png": "ch012.png", "hits": [_hit(script_name, 12, 0.5, (6, 6), (5, 5, 28, 28), False)]},
    ], overview=["overview.png", "overview-2.png"], failed=[{"image": str(images / "bad<1>.jpg"),
                                                             "reason": "cannot identify image file"}])
    layer12 = _project("layer 12 (features.30)", [], layer=12, overview=[])
    unnumbered = _project("avgpool", [], layer=None, overview=[])
    occlusion = {
        "kind": "occlude", "model": "embedded", "module": "features.11", "label": "layer 5 (features.11)",
        "size": 12, "stride": 2, "fill": [0.0], "target": "auto", "rule": "guided",
        "approximate": "drill-down factor 4, share 25%",
        "images": [
            {"png": "a/occlusion.png", "method": "incremental", "image": str(present), "target": 3,
             "target_name": "three & <more>", "prob_clean": "0.912345", "prob_min": "0.100000", "prob_min_y": 4,
             "prob_min_x": 6, "other_class": 5, "other_name": "five", "other_fraction": "0.2500"},
            {"png": f"{TRICKY}/occlusion.png", "method": "incremental", "image": str(tricky), "target": 1,
             "target_name": "one", "prob_clean": "0.500000", "prob_min": "0.400000", "prob_min_y": 0,
             "prob_min_x": 0, "other_class": -1, "other_name": "", "other_fraction": "0.0000"},
            {"png": "gone/occlusion.png", "method": "incremental", "image": str(missing), "target": 1,
             "target_name": "one", "prob_clean": "0.5", "prob_min": "0.4", "prob_min_y": 0, "prob_min_x": 0,
             "other_class": -1, "other_name": "", "other_fraction": "0.0000"},
        ],
        "failed": [],
    }
    deconv = {"kind": "deconv", "failed": [], "figures": [
        {"png": "a/layer5.png", "image": str(present), "model": "embedded", "layer": 5, "module": "features.11",
         "label": "layer 5 (features.11)", "rule": "guided", "hits": [_hit(present, 7, 3.0), _hit(present, 2, 1.0)]},
    ]}
    extra = {"kind": "saliency", "title": "Saliency <maps>", "failed": [{"image": "z.png", "reason": "too small"}],
             "figures": [{"png": "s1.png", "caption": "first & best"}, {"png": f"{TRICKY}.png"}]}
    for folder, data in [("layer5", layer5), ("layer12", layer12), ("aa", unnumbered), ("occlusion", occlusion),
                         ("deconv", deconv), ("extra", extra), ("listed", [1, 2]), ("nokind", {"figures": []})]:
        (out / folder).mkdir(parents=True)
        (out / folder / "index.json").write_text(json.dumps(data))
    (out / "broken").mkdir()
    (out / "broken" / "index.json").write_text('{"kind": "project", "channels": [')  # torn: skipped
    page = report.write_report(out)
    return out, images, page, page.read_text()


def test_page_has_one_section_per_readable_manifest_in_order(run):
    out, _, page, text = run
    assert page == out / "index.html" and page.is_file()
    parsed = Page(text)
    # Top-k layers by number (5 before 12), unnumbered after them, then occlusion, deconv and the rest;
    # broken, listed and nokind left out.
    order = ["layer5", "layer12", "aa", "occlusion", "deconv", "extra"]
    assert list(parsed.sections) == order
    kinds = {name: attrs["data-kind"] for name, attrs in parsed.sections.items()}
    assert kinds == {"extra": "saliency", "deconv": "deconv", "layer5": "project", "layer12": "project",
                     "aa": "project", "occlusion": "occlude"}
    header = [a["href"] for a in parsed.elements("a", None)
              if a.get("href", "").startswith("#") and not a.get("id", "").startswith("view")]
    assert header == [f"#{folder}" for folder in order]
    assert "extra" in parsed.section_text(None) and "Occlusion" in parsed.section_text("occlusion")


def test_project_section_links_every_channel_to_its_view(run):
    _, _, _, text = run
    parsed = Page(text)
    channels = [a for a in parsed.elements("a", "layer5") if a.get("class") == "channel"]
    assert [a["href"] for a in channels] == ["#layer5/3", "#layer5/12"]
    images = parsed.elements("img", "layer5")
    assert [i["src"] for i in images] == ["layer5/ch003.png", "layer5/ch012.png"]
    body = parsed.section_text("layer5")
    assert LABEL in body  # the label as text, not markup
    assert "ch 3 · max 4.25" in body and "ch 12 · max 0.5" in body
    assert "top 9 over 20 images; receptive field 39×39 px, stride 4." in body
    sheets = [a["href"] for a in parsed.elements("a", "layer5") if "overview" in a.get("href", "")]
    assert sheets == ["layer5/overview.png", "layer5/overview-2.png"]
    assert "none (no channel fired)" in parsed.section_text("layer12")
    assert not [a for a in parsed.elements("a", "layer12") if a.get("class") == "channel"]


def test_embedded_json_lists_layers_channels_and_hits(run):
    out, images, _, text = run
    blocks = DATA.findall(text)
    assert len(blocks) == 1
    data = json.loads(blocks[0])
    link = f"../{images.name}/a.png"  # from out/ to the image beside it
    assert (out / link).resolve() == (images / "a.png").resolve()
    assert data == {"layers": [
        {"slug": "layer5", "label": LABEL, "channels": [
            {"channel": 3, "png": "layer5/ch003.png", "hits": [
                {"value": 4.25, "image": str(images / "a.png"), "link": link, "position": [3, 4],
                 "box": [0, 0, 28, 28], "clipped": True},
                {"value": 2.0, "image": str(images / "gone.png"), "link": None, "position": [0, 1],
                 "box": [0, 0, 20, 21], "clipped": True}]},
            {"channel": 12, "png": "layer5/ch012.png", "hits": [
                {"value": 0.5, "image": "/data/</script><script>alert(2)</script>.png", "link": None,
                 "position": [6, 6], "box": [5, 5, 28, 28], "clipped": False}]}]},
    ]}  # layers where no channel fired have no channel view


def test_script_text_in_names_cannot_end_the_json_block(run):
    _, _, _, text = run
    block = DATA.findall(text)[0]
    assert "</" not in block
    # Exactly two script elements: the data and the page's script, nothing smuggled in by a name.
    assert len(Page(text).elements("script")) == 2
    assert len(re.findall(r"</script", text, re.I)) == 2


def test_comment_and_script_text_in_names_cannot_escape_the_json_block(tmp_path):
    out = tmp_path / "out"
    (out / "layer5").mkdir(parents=True)
    name = "/data/<!--<script>.png"
    (out / "layer5" / "index.json").write_text(json.dumps(
        _project("layer 5", [{"channel": 0, "png": "ch000.png", "hits": [_hit(name, 0, 1.0)]}])))
    block = DATA.findall(report.write_report(out).read_text())[0]
    assert json.loads(block)["layers"][0]["channels"][0]["hits"][0]["image"] == name
    # Neither '</' nor '<!--' in the block: then no HTML tokenizer state can end the element early or late.
    assert "</" not in block and "<!--" not in block


def test_every_link_and_image_is_relative(run):
    out, _, _, text = run
    parsed = Page(text)
    targets = [attrs[key] for tag in ("a", "img") for attrs in parsed.elements(tag) for key in ("href", "src")
               if key in attrs]
    assert len(targets) > 20
    for target in targets:
        assert urlparse(target).scheme == "" and not target.startswith(("/", "//")), target
        assert str(out.parent) not in target, target
        if not target.startswith(("#", "..")):  # into out: stays inside it
            assert (out / target).resolve().is_relative_to(out.resolve()), target


def test_input_images_link_relatively_or_not_at_all(run):
    out, images, _, text = run
    parsed = Page(text)
    links = {a["href"] for a in parsed.elements("a", "occlusion")} | {a["href"] for a in parsed.elements("a", "deconv")}
    inputs = {link for link in links if link.startswith("..")}
    assert inputs == {f"../{images.name}/a.png", f"../{images.name}/{quote(TRICKY)}.png"}  # percent-encoded
    for link in inputs:
        assert (out / link).resolve().parent == images.resolve()
    assert str(images / "gone.png") in parsed.section_text("occlusion")  # shown, not linked: it is gone


def test_occlusion_section_rows(run):
    _, images, _, text = run
    parsed = Page(text)
    sources = [i["src"] for i in parsed.elements("img", "occlusion")]
    assert sources == ["occlusion/a/occlusion.png", f"occlusion/{quote(TRICKY)}/occlusion.png",
                       "occlusion/gone/occlusion.png"]
    alts = [i["alt"] for i in parsed.elements("img", "occlusion")]
    assert alts[1] == f"occlusion of {images / TRICKY}.png"
    body = parsed.section_text("occlusion")
    assert "square 12 px, stride 2, target auto, guided rule for panel (c), APPROXIMATE maps (drill-down factor 4, share 25%)." in body
    assert "three & <more>" in body and "0.912" in body and "0.100 at (4, 6)" in body and "five (25.0%)" in body
    assert "–" in body  # no other class
    assert "occlusion/summary.csv" in {a["href"] for a in parsed.elements("a", "occlusion")}


def test_deconv_and_other_sections(run):
    _, images, _, text = run
    parsed = Page(text)
    assert [i["src"] for i in parsed.elements("img", "deconv")] == ["deconv/a/layer5.png"]
    assert "layer 5 (features.11), guided; channels 7, 2" in parsed.section_text("deconv")
    assert [i["src"] for i in parsed.elements("img", "extra")] == ["extra/s1.png", f"extra/{quote(TRICKY)}.png"]
    assert [i["alt"] for i in parsed.elements("img", "extra")] == ["first & best", f"{TRICKY}.png"]
    body = parsed.section_text("extra")
    assert "Saliency <maps>" in body and "first & best" in body and f"{TRICKY}.png" in body


def test_failed_files_are_listed(run):
    _, images, _, text = run
    parsed = Page(text)
    assert "1 failed files" in parsed.section_text("layer5")
    assert f"{images / 'bad<1>.jpg'}: cannot identify image file" in parsed.section_text("layer5")
    assert "z.png: too small" in parsed.section_text("extra")
    assert [d for d in parsed.elements("details", "occlusion")] == []  # none failed there
    assert [d["class"] for d in parsed.elements("details", "layer5")] == ["failed"]


def test_special_characters_are_escaped_outside_the_json(run):
    _, _, _, text = run
    html_only = DATA.sub("", text)
    for raw in (TRICKY, "<z>", "bad<1>", "three & <more>", "<maps>", "first & best", "</script><script>alert"):
        assert raw not in html_only, raw
    assert "x&amp;y" in html_only and "&lt;z&gt;" in html_only and "&quot;" in html_only
    # Only the page's own markup: no element from a name or label made it into the document.
    tags = {name for _, name, _ in Page(text).tags}
    assert tags <= {"html", "head", "meta", "title", "style", "body", "header", "h1", "nav", "a", "p", "kbd",
                    "section", "h2", "details", "summary", "ul", "li", "div", "img", "span", "table", "tr", "th",
                    "td", "figure", "figcaption", "thead", "tbody", "script"}
    assert len(Page(text).elements("script")) == 2


def test_empty_output_folder_gives_an_empty_page(tmp_path):
    text = report.write_report(tmp_path).read_text()
    parsed = Page(text)
    assert parsed.sections == {}
    assert "nothing yet" in parsed.section_text(None)
    assert json.loads(DATA.findall(text)[0]) == {"layers": []}


def test_names_with_url_characters_stay_whole_in_links(tmp_path):
    """A ``#`` or ``%`` in an image's name (its output folder's name) must not end or garble the path."""
    out = tmp_path / "out"
    (out / "occlusion").mkdir(parents=True)
    row = {"png": "a#1 50%/occlusion.png", "image": "/in/a#1 50%.png", "target_name": "cat", "prob_clean": "0.9",
           "prob_min": "0.1", "prob_min_y": 0, "prob_min_x": 0, "other_class": -1, "other_name": "",
           "other_fraction": "0"}
    (out / "occlusion" / "index.json").write_text(json.dumps({
        "kind": "occlude", "model": "m", "label": "layer 5", "size": 6, "stride": 1, "fill": [0.0],
        "target": "auto", "rule": "deconvnet", "approximate": "", "images": [row], "failed": []}))
    parsed = Page(report.write_report(out).read_text())
    (source,) = [i["src"] for i in parsed.elements("img", "occlusion")]
    assert "#" not in source and unquote(source) == "occlusion/a#1 50%/occlusion.png"


def test_a_manifest_that_does_not_fit_its_kind_is_shown_as_unreadable(tmp_path):
    out = tmp_path / "out"
    for folder, data in {"layer5": {"kind": "project", "label": "layer 5"},  # no channels, no model…
                         "notes": {"kind": "notes", "figures": [{}]},         # a figure without its png
                         "layer2": _project("layer 2 (features.4)", [], layer="two")}.items():
        (out / folder).mkdir(parents=True)
        (out / folder / "index.json").write_text(json.dumps(data))
    parsed = Page(report.write_report(out).read_text())
    assert {name: attrs["data-kind"] for name, attrs in parsed.sections.items()} == {
        "layer2": "project", "layer5": "unreadable", "notes": "unreadable"}
    assert "layer5/index.json cannot be shown" in parsed.section_text("layer5")
