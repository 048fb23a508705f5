"""``OUT/index.html``: one page over every result in ``OUT``, readable from ``file://`` with no network.

Every job writes ``OUT/<folder>/index.json`` with a ``kind`` (``project``, ``occlude``,
``deconv``, or an analysis's) and calls ``write_report``; ``vizdeconv report OUT`` does the
same on its own. The page has a section per result folder. A top-k layer's channels open in a
channel view (``#<layer>/<channel>``: the figure large, with its top activations), where ←/→
step through the channels, ↑/↓ through the layers and Esc closes; the script and styles are
inline, so the page works offline.
"""

from __future__ import annotations

import functools
import html
import json
import os
from pathlib import Path
from urllib.parse import quote

from vizdeconv import render
from vizdeconv.outputs import write_atomic

PAGE = "index.html"


def write_report(out: str | os.PathLike) -> Path:
    """Rebuild ``out/index.html`` from the ``index.json`` manifests under ``out``; returns its path."""
    out = Path(out)
    _link.cache_clear()
    manifests = []
    for index in out.glob("*/index.json"):
        try:
            data = json.loads(index.read_text())
        except (OSError, ValueError):
            continue  # not ours, or unreadable: the rest of the report still stands
        if isinstance(data, dict) and "kind" in data:
            manifests.append((index.parent.name, data))
    manifests.sort(key=_order)
    sections, layers = [], []
    for folder, data in manifests:
        try:
            sections.append(SECTIONS.get(data["kind"], _figures_section)(folder, data, out))
            if data["kind"] == "project" and data["channels"]:  # a layer where no channel fired has no view
                layers.append(_layer_data(folder, data, out))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            sections.append(f'<section id="{_attr(folder)}" data-kind="unreadable"><h2>{_text(folder)}</h2>'
                            f'<p class="failed">{_text(folder)}/index.json cannot be shown ({_text(repr(error))}); '
                            'rerun the command that wrote it.</p></section>')
    nav = " · ".join(f'<a href="#{_url(folder)}">{_text(_title(folder, data))}</a>' for folder, data in manifests)
    page = TEMPLATE.format(
        nav=nav or "nothing yet: run vizdeconv project, occlude or deconv with this --out",
        sections="\n".join(sections), data=json.dumps({"layers": layers}).replace("<", "\\u003c"),
        style=STYLE, script=SCRIPT, display=_text(render.DISPLAY.capitalize()))
    return write_atomic(out / PAGE, lambda file: file.write(page.encode()))


def _order(manifest: tuple[str, dict]) -> tuple:
    """Top-k layers first (numbered ones by number, bottom up), then occlusion, deconv, the rest by folder."""
    folder, data = manifest
    kinds = list(SECTIONS)
    kind = kinds.index(data["kind"]) if data["kind"] in kinds else len(kinds)
    number = data.get("layer") if data["kind"] == "project" and isinstance(data.get("layer"), int) else None
    return kind, number is None, number or 0, folder


def _text(value) -> str:
    return html.escape(str(value), quote=False)


def _attr(value) -> str:
    return html.escape(str(value), quote=True)


def _url(path: str) -> str:
    """A relative path as it goes into ``src``/``href``: percent-encoded (a ``#`` or ``%`` in a file
    name stays part of it), then escaped for the attribute."""
    return _attr(quote(path))


def _title(folder: str, data: dict) -> str:
    return {"project": data.get("label", folder), "occlude": "occlusion", "deconv": "deconv"}.get(data["kind"], folder)


@functools.cache  # a hit image recurs across channels; write_report clears it so files can come and go
def _link(path: str, out: Path) -> str | None:
    """A percent-encoded relative link from the report to an input file, or None when it is not there."""
    target = Path(path).resolve()
    return quote(Path(os.path.relpath(target, out.resolve())).as_posix()) if target.is_file() else None


def _layer_data(folder: str, data: dict, out: Path) -> dict:
    """What the channel view shows of a top-k layer (the page's JSON)."""
    return {"slug": folder, "label": data["label"], "channels": [
        {"channel": c["channel"], "png": quote(f"{folder}/{c['png']}"), "hits": [
            {"value": hit["value"], "image": hit["image"], "link": _link(hit["image"], out),
             "position": hit["position"], "box": hit["box"], "clipped": hit["clipped"]} for hit in c["hits"]]}
        for c in data["channels"]]}


def _image_cell(path: str, out: Path) -> str:
    link = _link(path, out)
    return f'<a href="{_attr(link)}">{_text(path)}</a>' if link else _text(path)


def _failed(data: dict) -> str:
    failed = data.get("failed", [])
    if not failed:
        return ""
    items = "".join(f"<li>{_text(f['image'])}: {_text(f['reason'])}</li>" for f in failed)
    return f'<details class="failed"><summary>{len(failed)} failed files</summary><ul>{items}</ul></details>'


def _channel_card(folder: str, channel: dict) -> str:
    """A channel's figure, small, opening its channel view (``#<layer>/<channel>``)."""
    number = channel["channel"]
    return (f'<a class="channel" href="#{_url(folder)}/{number}" title="channel {number}">'
            f'<img src="{_url(folder + "/" + channel["png"])}" alt="channel {number}" loading="lazy">'
            f'<span>ch {number} · max {channel["hits"][0]["value"]:.3g}</span></a>')


def _project_section(folder: str, data: dict, out: Path) -> str:
    cards = "".join(_channel_card(folder, channel) for channel in data["channels"])
    sheets = " ".join(f'<a href="{_url(folder + "/" + name)}">{_text(name)}</a>' for name in data["overview"])
    field = data["receptive_field"]
    return (f'<section id="{_attr(folder)}" data-kind="project"><h2>{_text(data["label"])}</h2>'
            f'<p>{_text(data["model"])} ({_text(data["weights"])}), {_text(data["rule"])} rule; top {data["k"]} '
            f'over {data["images_scanned"]} images; receptive field {field["size"][0]}×{field["size"][1]} px, '
            f'stride {field["stride"][0]}. Overview: {sheets or "none (no channel fired)"}; '
            f'<a href="{_url(folder)}/index.json">index.json</a>. Click a channel for its view.</p>'
            f'{_failed(data)}<div class="channels">{cards}</div></section>')


def _occlude_section(folder: str, data: dict, out: Path) -> str:
    rows = "".join(
        f'<tr><td>{_thumbnail(folder, r["png"], "occlusion of " + r["image"])}</td><td>{_image_cell(r["image"], out)}</td>'
        f'<td>{_text(r["target_name"])}</td><td>{float(r["prob_clean"]):.3f}</td><td>{float(r["prob_min"]):.3f} at '
        f'({r["prob_min_y"]}, {r["prob_min_x"]})</td><td>{_other_class(r)}</td></tr>'
        for r in data["images"])
    return (f'<section id="{_attr(folder)}" data-kind="occlude"><h2>Occlusion</h2>'
            f'<p>{_text(data["model"])}, {_text(data["label"])}: square {data["size"]} px, stride {data["stride"]}, '
            f'target {_text(data["target"])}, {_text(data["rule"])} rule for panel (c)'
            f'{", APPROXIMATE maps (" + _text(data["approximate"]) + ")" if data["approximate"] else ""}. '
            f'<a href="{_url(folder)}/summary.csv">summary.csv</a></p>{_failed(data)}'
            '<table class="occlusion"><tr><th>figure</th><th>image</th><th>target</th><th>p unoccluded</th>'
            f'<th>lowest p</th><th>most frequent other class</th></tr>{rows}</table></section>')


def _other_class(row: dict) -> str:
    if row["other_class"] == -1:
        return "–"
    return f'{_text(row["other_name"])} ({float(row["other_fraction"]):.1%})'


def _thumbnail(folder: str, png: str, alt: str) -> str:
    """A picture of ``folder`` shown small, linking to itself full size."""
    source = _url(f"{folder}/{png}")
    return f'<a href="{source}"><img src="{source}" alt="{_attr(alt)}" loading="lazy"></a>'


def _card(folder: str, png: str, alt: str, caption: str) -> str:
    """A figure's thumbnail over a caption (HTML)."""
    return f'<figure>{_thumbnail(folder, png, alt)}<figcaption>{caption}</figcaption></figure>'


def _deconv_caption(figure: dict, out: Path) -> tuple[str, str]:
    """A deconv figure's alt text (its image) and caption (HTML): the image linked, layer, rule, channels."""
    channels = ", ".join(str(h["channel"]) for h in figure["hits"])
    return figure["image"], (f'{_image_cell(figure["image"], out)}: {_text(figure["label"])}, '
                             f'{_text(figure["rule"])}; channels {channels}')


def _plain_caption(figure: dict, out: Path) -> tuple[str, str]:
    caption = figure.get("caption", figure["png"])
    return caption, _text(caption)


def _figures_section(folder: str, data: dict, out: Path, caption=_plain_caption) -> str:
    """A manifest's ``figures`` as captioned thumbnails under its ``title``, and its failed files; each
    figure captioned by ``caption`` (default: its own ``caption``)."""
    cards = "".join(_card(folder, f["png"], *caption(f, out)) for f in data.get("figures", []))
    return (f'<section id="{_attr(folder)}" data-kind="{_attr(data["kind"])}"><h2>{_text(data.get("title", folder))}'
            f'</h2>{_failed(data)}<div class="figures">{cards}</div></section>')


SECTIONS = {"project": _project_section, "occlude": _occlude_section,
            "deconv": functools.partial(_figures_section, caption=_deconv_caption)}  # captioned from their hits

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 1.5em 2em; color: #222; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd; padding: .5em 0; z-index: 1; }
h1 { font-size: 1.3em; margin: .3em 0; } h2 { margin-top: 1.5em; }
.channels { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 12px; }
.channel { display: block; text-decoration: none; color: #222; border: 1px solid #ccc; padding: 4px; }
.channel:hover, .channel:focus { border-color: #0072b2; outline: 2px solid #0072b2; }
.channel img, figure img { width: 100%; display: block; }
.channel span { font-size: 13px; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 16px; }
figure { margin: 0; } figcaption { font-size: 13px; }
section:is([data-kind="filters"], [data-kind="invariance"], [data-kind="correspondence"]) .figures {
  grid-template-columns: minmax(0, 1300px); }  /* sheets, charts and tables: read at full size */
table.occlusion { border-collapse: collapse; } .occlusion td, .occlusion th { border-bottom: 1px solid #ddd;
  padding: 4px 8px; text-align: left; vertical-align: middle; } .occlusion img { width: 360px; display: block; }
.failed { color: #a33; margin: .5em 0; }
#view { position: fixed; inset: 0; background: #fff; overflow: auto; padding: 1em 2em; z-index: 2; }
#view[hidden] { display: none; }
#view nav a { margin-right: 1em; } #view-figure { max-width: 100%; image-rendering: pixelated; border: 1px solid #ccc; }
#view table { border-collapse: collapse; margin-top: 1em; font-size: 14px; }
#view td, #view th { border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: left; }
kbd { border: 1px solid #bbb; border-radius: 3px; padding: 0 4px; font-size: 12px; }
"""

SCRIPT = """
const data = JSON.parse(document.getElementById('data').textContent);
const view = document.getElementById('view');
function route() {
  let hash;
  try { hash = decodeURIComponent(location.hash); } catch (error) { return null; }  // a malformed hash
  const match = /^#(.+)\\/(\\d+)$/.exec(hash);
  if (!match) return null;
  const layer = data.layers.findIndex(l => l.slug === match[1]);
  const channel = layer < 0 ? -1 : data.layers[layer].channels.findIndex(c => c.channel === Number(match[2]));
  return channel < 0 ? null : {layer, channel};
}
function go(layer, channel) {
  const l = data.layers[layer];
  location.hash = '#' + encodeURIComponent(l.slug) + '/' + l.channels[channel].channel;
}
function cell(text, link) {
  const td = document.createElement('td');
  if (link) { const a = document.createElement('a'); a.href = link; a.textContent = text; td.append(a); }
  else td.textContent = text;
  return td;
}
function show() {
  const at = route();
  view.hidden = !at;
  if (!at) return;
  const layer = data.layers[at.layer], channel = layer.channels[at.channel];
  document.getElementById('view-title').textContent =
    layer.label + ', channel ' + channel.channel + ' (' + (at.channel + 1) + ' of ' + layer.channels.length + ')';
  const figure = document.getElementById('view-figure');
  figure.onload = () => { figure.style.width = Math.min(figure.naturalWidth * 1.6, view.clientWidth - 64) + 'px'; };
  figure.src = channel.png;
  const count = layer.channels.length, link = c => '#' + encodeURIComponent(layer.slug) + '/' + layer.channels[(c + count) % count].channel;
  document.getElementById('view-close').href = '#' + encodeURIComponent(layer.slug);
  document.getElementById('view-previous').href = link(at.channel - 1);
  document.getElementById('view-next').href = link(at.channel + 1);
  const rows = document.getElementById('view-hits');
  rows.replaceChildren();
  channel.hits.forEach((hit, i) => {
    const tr = document.createElement('tr');
    tr.append(cell('#' + (i + 1)), cell(hit.value.toPrecision(4)), cell(hit.image, hit.link),
              cell(hit.position.join(', ')), cell(hit.box.join(', ') + (hit.clipped ? ' (clipped)' : '')));
    rows.append(tr);
  });
}
document.addEventListener('keydown', event => {
  const at = route();
  if (!at || event.altKey || event.ctrlKey || event.metaKey) return;
  const count = data.layers[at.layer].channels.length, layers = data.layers.length;
  const moves = {
    ArrowRight: () => go(at.layer, (at.channel + 1) % count),
    ArrowLeft: () => go(at.layer, (at.channel + count - 1) % count),
    ArrowDown: () => go((at.layer + 1) % layers, 0),
    ArrowUp: () => go((at.layer + layers - 1) % layers, 0),
    Escape: () => { location.hash = '#' + encodeURIComponent(data.layers[at.layer].slug); },
  };
  if (moves[event.key]) { event.preventDefault(); moves[event.key](); }
});
window.addEventListener('hashchange', show);
show();
"""

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vizdeconv report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{style}</style></head><body>
<header><h1>vizdeconv: what the network has learned</h1><nav>{nav}</nav></header>
<p>{display}. In a channel view: <kbd>←</kbd> <kbd>→</kbd> channels, <kbd>↑</kbd> <kbd>↓</kbd> layers,
<kbd>Esc</kbd> back.</p>
{sections}
<div id="view" hidden><nav><a id="view-close" href="#view">× close (Esc)</a>
<a id="view-previous" href="#view">← previous</a><a id="view-next" href="#view">next →</a></nav><h2 id="view-title"></h2><img id="view-figure" alt="channel figure">
<table><thead><tr><th>rank</th><th>activation</th><th>image</th><th>position (y, x)</th>
<th>receptive field (y0, x0, y1, x1)</th></tr></thead><tbody id="view-hits"></tbody></table></div>
<script type="application/json" id="data">{data}</script>
<script>{script}</script>
</body></html>
"""
