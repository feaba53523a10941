"""Test data for the TTA service: CIFAR-10 JPEG archives, CIFAR-10-C corruptions and test-stream orders.

Importing the package loads numpy only; Pillow, scipy and scikit-image are imported when first needed.
"""

from tta_data.cifar import JpegDataset, decode_images, load_cifar10, load_jpeg_npz
from tta_data.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    STOCHASTIC_CORRUPTIONS,
    CorruptionFn,
    corrupt,
    corruption_rng,
    get_corruption,
)
from tta_data.streams import (
    Order,
    StreamBatch,
    balanced_subset,
    build_stream,
    dirichlet_order,
    iid_order,
    sorted_order,
    stream_indices,
    stream_length,
    stream_num_batches,
    stream_order,
)

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "STOCHASTIC_CORRUPTIONS",
    "CorruptionFn",
    "JpegDataset",
    "Order",
    "StreamBatch",
    "balanced_subset",
    "build_stream",
    "corrupt",
    "corruption_rng",
    "decode_images",
    "dirichlet_order",
    "get_corruption",
    "iid_order",
    "load_cifar10",
    "load_jpeg_npz",
    "sorted_order",
    "stream_indices",
    "stream_length",
    "stream_num_batches",
    "stream_order",
]
