"""Train a multi-encoder CLIP model from a YAML recipe.

    composer train.py yamls/quickstart.yaml [key=value ...]
    composer -n 2 train.py yamls/mvclip.yaml max_duration=10ba

Overrides use OmegaConf's dotted keys, for example `optimizer.lr=1e-4`.
"""

import logging
import re
import sys

from composer.utils import dist

from composer_clip.builders import build_trainer, load_config


def natural_sort_key(name: str) -> list:
    """Sort key that orders the numbers inside names by value, so recall@5 comes before recall@10."""
    return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', name)]


def main(argv: list[str]) -> dict[str, float]:
    if not argv:
        sys.exit(__doc__)
    config = load_config(argv[0], argv[1:])
    trainer = build_trainer(config)
    # Autoresume and load_path restore the timestamp while the Trainer is built.
    first_batch = int(trainer.state.timestamp.batch) + 1
    trainer.fit()
    last_batch = int(trainer.state.timestamp.batch)

    eval_metrics = {name: float(value) for name, value in trainer.state.eval_metric_values.items()}
    world_size = dist.get_world_size()
    if dist.get_global_rank() == 0:
        print(f'Trained batches {first_batch} to {last_batch} on {world_size} rank{"s" if world_size > 1 else ""}')
    if dist.get_global_rank() == 0 and eval_metrics:
        print('Held-out metrics after training:')
        for name, value in sorted(eval_metrics.items(), key=lambda item: natural_sort_key(item[0])):
            print(f'  {name}: {value:.4f}')
    trainer.close()
    return eval_metrics


# Composer's remote uploader starts worker processes with spawn, which re-imports this
# file: the guard keeps those workers from training too.
if __name__ == '__main__':
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(levelname)s: %(message)s')
    logging.getLogger('composer').setLevel(logging.WARNING)
    main(sys.argv[1:])
