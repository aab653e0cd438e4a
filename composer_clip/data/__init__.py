"""Image-text data: MDS writing, streaming datasets, per-tower transforms and batching."""

from composer_clip.data.bad_samples import BAD_SAMPLE_REASONS, BadSample, BadSampleCounts, BadSampleError
from composer_clip.data.dataloader import build_image_text_dataloader, collate_image_text
from composer_clip.data.dataset import StreamingImageTextDataset
from composer_clip.data.mds import SKIP_REASONS, MDSWriteCounts, write_image_text_mds
from composer_clip.data.sources import (
    IMAGE_EXTENSIONS,
    ImageCaptionFiles,
    find_image_caption_files,
    iter_csv_samples,
    iter_folder_samples,
    read_caption_file,
)
from composer_clip.data.transforms import (
    ImageTransform,
    build_image_transform,
    convert_to_rgb,
    decode_image,
    normalize_preprocess_cfg,
)

__all__ = [
    'BAD_SAMPLE_REASONS',
    'BadSample',
    'BadSampleCounts',
    'BadSampleError',
    'IMAGE_EXTENSIONS',
    'SKIP_REASONS',
    'ImageCaptionFiles',
    'ImageTransform',
    'MDSWriteCounts',
    'StreamingImageTextDataset',
    'build_image_text_dataloader',
    'build_image_transform',
    'collate_image_text',
    'convert_to_rgb',
    'decode_image',
    'find_image_caption_files',
    'iter_csv_samples',
    'iter_folder_samples',
    'normalize_preprocess_cfg',
    'read_caption_file',
    'write_image_text_mds',
]
