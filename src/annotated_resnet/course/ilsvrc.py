"""The context of the abstract: the ILSVRC classification results 2010-2015 behind the
"revolution of depth", with the depth of each entry's networks, and their plot (error
against depth), as notebook 1 draws it."""

from __future__ import annotations

from typing import NamedTuple

import matplotlib.pyplot as plt


class IlsvrcEntry(NamedTuple):
    """One ILSVRC classification entry: top-5 error (%) on the test set, depth in weighted
    layers (``None``: not a deep network), the place the team took that year, and whether
    the entry also trained on images outside the competition's training set."""

    year: int
    team: str
    top5_error: float
    depth: int | None
    place: int
    extra_data: bool = False
    note: str = ""


#: The ILSVRC classification winners 2010-2015, with two entries each for 2012 and 2013: the
#: winning team's best entry trained on the competition's data alone, and its best entry that
#: also trained on a larger ImageNet release (AlexNet: Krizhevsky et al. 2012, Table 2;
#: Clarifai: Szegedy et al. 2015, Table 2); and VGG, 2nd in 2014. ResNet's 3.57% is the
#: abstract's ensemble.
ILSVRC_ENTRIES = (
    IlsvrcEntry(2010, "NEC-UIUC", 28.2, None, 1),
    IlsvrcEntry(2011, "XRCE", 25.8, None, 1),
    IlsvrcEntry(2012, "AlexNet", 16.4, 8, 1, note="5 CNNs"),
    IlsvrcEntry(2012, "AlexNet", 15.3, 8, 1, extra_data=True,
                note="the winning entry: 7 CNNs, 2 of them pre-trained on the ImageNet Fall 2011 release"),
    IlsvrcEntry(2013, "Clarifai", 11.7, 8, 1, note="published by Zeiler & Fergus, the network called ZFNet"),
    IlsvrcEntry(2013, "Clarifai", 11.2, 8, 1, extra_data=True, note="with extra ImageNet training images"),
    IlsvrcEntry(2014, "VGG", 7.3, 19, 2),
    IlsvrcEntry(2014, "GoogLeNet", 6.7, 22, 1),
    IlsvrcEntry(2015, "ResNet", 3.57, 152, 1, note="an ensemble; its deepest nets have 152 layers"),
)


def ilsvrc_winners(entries=ILSVRC_ENTRIES, extra_data: bool = False) -> list[IlsvrcEntry]:
    """Each year's winning team, by its best entry: among entries trained on the competition's
    data alone (the default, so that every year compares like with like), or among all."""
    best = {}
    for entry in entries:
        if entry.place == 1 and (extra_data or not entry.extra_data) and (
                entry.year not in best or entry.top5_error < best[entry.year].top5_error):
            best[entry.year] = entry
    return [best[year] for year in sorted(best)]


def plot_revolution_of_depth(entries=ILSVRC_ENTRIES):
    """Top-5 error against depth (log scale): the winners on the competition's data alone as
    filled dots, the same teams' entries with extra data as open squares, other places as open
    circles; the shallow winners, which have no depth to plot, as dashed horizontal lines."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    winners = ilsvrc_winners(entries)
    deep = [e for e in entries if e.depth is not None]
    for e in deep:
        marker = "s" if e.extra_data else "o"
        ax.plot(e.depth, e.top5_error, marker, ms=7, color="tab:blue", mfc="tab:blue" if e in winners else "white")
        label = f"{e.year} {e.team}{'' if e.place == 1 else f' ({e.place}nd place)'}: {e.top5_error}%"
        label += " (extra data)" if e.extra_data else ""
        # one-line labels; beside a close neighbour they move apart (up/down, or to the left)
        close = [x for x in deep if x is not e and x.depth == e.depth and abs(x.top5_error - e.top5_error) < 3]
        dy = 0 if not close else 6 if e.top5_error > close[0].top5_error else -6
        crowded_right = any(1 < x.depth / e.depth < 1.3 for x in deep)
        ax.annotate(label, (e.depth, e.top5_error), textcoords="offset points", fontsize=8, va="center",
                    xytext=(-8, dy) if crowded_right else (8, dy), ha="right" if crowded_right else "left")
    for e in entries:
        if e.depth is None:
            ax.axhline(e.top5_error, color="0.6", ls="--", lw=1)
            ax.annotate(f"{e.year} {e.team} (shallow): {e.top5_error}%", (min(x.depth for x in deep), e.top5_error),
                        textcoords="offset points", xytext=(0, 3), fontsize=8, color="0.4")
    ax.plot([], [], "o", color="tab:blue", label="winner, competition data only")
    ax.plot([], [], "s", color="tab:blue", mfc="white", label="same team, with extra data")
    ax.plot([], [], "o", color="tab:blue", mfc="white", label="2nd place")
    ax.legend(fontsize=8, loc="center right")
    ax.set_xscale("log")
    depths = sorted({e.depth for e in deep})
    ax.set_xticks(depths, [str(d) for d in depths])          # ticks at the entries' own depths
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlim(min(e.depth for e in deep) * 0.7, max(e.depth for e in deep) * 2.5)
    ax.set_ylim(0, max(e.top5_error for e in entries) * 1.15)
    ax.set_xlabel("depth (weighted layers, log scale)")
    ax.set_ylabel("ILSVRC top-5 test error (%)")
    ax.set_title("ILSVRC classification: the revolution of depth")
    fig.tight_layout()
    return fig


# --- Tables 3 to 5 of the paper: ResNets beside the earlier methods (notebook 5) ---


class PaperResult(NamedTuple):
    """One row of the paper's Table 3, 4 or 5: ImageNet error (%), top-1 (``None`` where the
    table gives none) and top-5; ``earlier`` marks the methods that came before ResNets."""

    table: int
    method: str
    top1: float | None
    top5: float
    earlier: bool = False
    note: str = ""


#: What each table measures, as its caption says.
RESULT_TABLES = {
    3: "Table 3: one model, 10-crop testing, ImageNet validation set",
    4: "Table 4: one model, ImageNet validation set (each method's best single-model result)",
    5: "Table 5: ensembles, ImageNet test set (top-5 only, from the test server)",
}

#: The rows of Tables 3 to 5, the earlier methods first, as the paper prints them.
PAPER_RESULTS = (
    PaperResult(3, "VGG-16", 28.07, 9.33, True, "tested by the ResNet authors"),
    PaperResult(3, "GoogLeNet", None, 9.15, True),
    PaperResult(3, "PReLU-net", 24.27, 7.38, True),
    PaperResult(3, "plain-34", 28.54, 10.02),
    PaperResult(3, "ResNet-34 A", 25.03, 7.76),
    PaperResult(3, "ResNet-34 B", 24.52, 7.46),
    PaperResult(3, "ResNet-34 C", 24.19, 7.40),
    PaperResult(3, "ResNet-50", 22.85, 6.71),
    PaperResult(3, "ResNet-101", 21.75, 6.05),
    PaperResult(3, "ResNet-152", 21.43, 5.71),
    PaperResult(4, "VGG (ILSVRC'14)", None, 8.43, True, "on the test set"),
    PaperResult(4, "GoogLeNet (ILSVRC'14)", None, 7.89, True),
    PaperResult(4, "VGG (v5)", 24.4, 7.1, True),
    PaperResult(4, "PReLU-net", 21.59, 5.71, True),
    PaperResult(4, "BN-Inception", 21.99, 5.81, True),
    PaperResult(4, "ResNet-34 B", 21.84, 5.71),
    PaperResult(4, "ResNet-34 C", 21.53, 5.60),
    PaperResult(4, "ResNet-50", 20.74, 5.25),
    PaperResult(4, "ResNet-101", 19.87, 4.60),
    PaperResult(4, "ResNet-152", 19.38, 4.49),
    PaperResult(5, "VGG (ILSVRC'14)", None, 7.32, True),
    PaperResult(5, "GoogLeNet (ILSVRC'14)", None, 6.66, True),
    PaperResult(5, "VGG (v5)", None, 6.8, True),
    PaperResult(5, "PReLU-net", None, 4.94, True),
    PaperResult(5, "BN-Inception", None, 4.82, True),
    PaperResult(5, "ResNet (ILSVRC'15)", None, 3.57, note="six models of different depths"),
)


def paper_results(table: int, results=PAPER_RESULTS) -> dict[str, PaperResult]:
    """The rows of one table, by method."""
    return {r.method: r for r in results if r.table == table}


def format_results(table: int, results=PAPER_RESULTS) -> str:
    """One table as text: its caption, then method, top-1 and top-5 error, the earlier methods
    marked "earlier"."""
    rows = paper_results(table, results).values()
    width = max(len(r.method) for r in rows) + 2
    lines = [RESULT_TABLES[table], f"  {'method':<{width}}{'top-1':>7}{'top-5':>7}"]
    for r in rows:
        top1 = "-" if r.top1 is None else f"{r.top1:.2f}"
        remarks = ", ".join(x for x in ("earlier" if r.earlier else "", r.note) if x)
        lines.append(f"  {r.method:<{width}}{top1:>7}{r.top5:>7.2f}" + (f"   ({remarks})" if remarks else ""))
    return "\n".join(lines)
