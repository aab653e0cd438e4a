"""Run train.py's pipeline and record what it did, for the resume tests.

Every rank appends the dataset indices of each batch it trains to
`<record_dir>/samples-rank<r>.jsonl`. At the end, rank 0 saves the full model state
dict to `<record_dir>/final.pt`.

    python -m composer.cli.launcher -n 2 tests/scripts/train_and_record.py RECORD_DIR RECIPE [key=value ...]
"""

import json
import sys
from pathlib import Path

import torch
from composer import Callback
from composer.utils import dist

from composer_clip.builders import build_trainer, load_config
from composer_clip.fsdp2_utils import get_fsdp2_state_dict


class RecordSamples(Callback):
    def __init__(self, record_dir: Path):
        self.record_dir = record_dir

    def after_dataloader(self, state, logger):
        entry = {'batch': int(state.timestamp.batch) + 1, 'samples': state.batch['sample_index'].tolist()}
        with open(self.record_dir / f'samples-rank{dist.get_global_rank()}.jsonl', 'a') as file:
            file.write(json.dumps(entry) + '\n')


def main(argv):
    record_dir = Path(argv[0])
    record_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(load_config(argv[1], argv[2:]))
    trainer.state.callbacks.append(RecordSamples(record_dir))
    first_batch = int(trainer.state.timestamp.batch) + 1
    trainer.fit()

    state_dict = get_fsdp2_state_dict(trainer.state.model, full_state_dict=True)
    if dist.get_global_rank() == 0:
        torch.save(state_dict, record_dir / 'final.pt')
        print(f'Trained batches {first_batch} to {int(trainer.state.timestamp.batch)}')
    trainer.close()


if __name__ == '__main__':
    main(sys.argv[1:])
