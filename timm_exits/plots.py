""" The accuracy (regression: MAE) / compute trade-off plot of an evaluation (``eval.json`` of
``timm_exits.evaluation``)."""
from typing import Any, Dict

from ._files import atomic_write

__all__ = ['plot_tradeoff']


def plot_tradeoff(result: Dict[str, Any], path: str) -> None:
    """Accuracy against average compute (MEViT Fig. 2, 000_*.txt), practical exits circled (Fig. 5, 001_*.txt);
    for LifeRegress, accuracy against the FLOPs ratio at each keep rate. Written atomically."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    if result.get('task') == 'regression':
        _regression(ax, result)
    elif 'exits' in result:
        ex = result['exits']
        th = sorted(result['thresholds'], key=lambda r: r['mean_cost'])
        ax.plot([r['mean_cost'] for r in th], [r['accuracy'] for r in th], '-', color='tab:blue', alpha=.8,
                label='per-image early exit (thresholds)')
        ax.plot([e['cost'] for e in ex], [e['accuracy'] for e in ex], 's', color='tab:orange', label='single exit')
        bb = result.get('budgeted_batch') or []
        if bb:
            ax.plot([r['mean_cost'] for r in bb], [r['accuracy'] for r in bb], 'x--', color='tab:red', alpha=.8,
                    label=f'budgeted batch (threshold chosen on {result.get("budgeted_batch_chosen_on", "?")})')
        prac = [e for e in ex if e['practical']]
        ax.plot([e['cost'] for e in prac], [e['accuracy'] for e in prac], 'o', ms=14, mfc='none', color='tab:green',
                label='practical exit')
        for e in ex:
            ax.annotate(str(e['layer']), (e['cost'], e['accuracy']), textcoords='offset points', xytext=(4, -10),
                        fontsize=8)
        ax.axhline(ex[-1]['accuracy'], ls='--', color='grey', lw=1, label='full model')
        ax.set_xlabel('average compute (share of the full model\'s FLOPs)')
    elif 'keep_rates' in result:
        kr = result['keep_rates']
        ax.plot([k['flops_ratio'] for k in kr], [k['accuracy'] for k in kr], 'o-', color='tab:blue')
        for k in kr:
            ax.annotate(f'rho={k["keep_rate"]:g}', (k['flops_ratio'], k['accuracy']), textcoords='offset points',
                        xytext=(4, 4), fontsize=8)
        ax.set_xlabel('FLOPs ratio to the full model')
    if result.get('task') != 'regression':
        ax.set_ylabel('top-1 accuracy (%)')
    ax.set_title(f'{result["model"]} on {result["dataset"]} ({result["num_images"]} images)', fontsize=9)
    ax.grid(alpha=.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc='best')
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png'))
    plt.close(fig)


def _regression(ax: Any, result: Dict[str, Any]) -> None:
    """MAE against average compute (lower is better): each criterion's threshold sweep and budgeted batch, each exit
    alone, practical exits (lower MAE than every earlier exit, II-A of 001_*.txt) circled."""
    ex = result['exits']
    for (name, rows), color in zip(sorted(result['thresholds'].items()), ('tab:blue', 'tab:purple')):
        rows = sorted(rows, key=lambda r: r['mean_cost'])
        ax.plot([r['mean_cost'] for r in rows], [r['mae'] for r in rows], '-', color=color, alpha=.8,
                label=f'per-image early exit ({name})')
        bb = result.get('budgeted_batch', {}).get(name) or []
        if bb:
            ax.plot([r['mean_cost'] for r in bb], [r['mae'] for r in bb], 'x--', color=color, alpha=.6,
                    label=f'budgeted batch ({name})')
    ax.plot([e['cost'] for e in ex], [e['mae'] for e in ex], 's', color='tab:orange', label='single exit (budget)')
    prac = [e for e in ex if e['practical']]
    ax.plot([e['cost'] for e in prac], [e['mae'] for e in prac], 'o', ms=14, mfc='none', color='tab:green',
            label='practical exit')
    for e in ex:
        ax.annotate(str(e['layer']), (e['cost'], e['mae']), textcoords='offset points', xytext=(4, 4), fontsize=8)
    ax.axhline(ex[-1]['mae'], ls='--', color='grey', lw=1, label='full model')
    ax.set_xlabel('average compute (share of the full model\'s FLOPs)')
    ax.set_ylabel('MAE (target units)')
