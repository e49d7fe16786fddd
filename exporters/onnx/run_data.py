"""Which images verify the export: the sites' own validation images, as their splits are recorded in the
checkpoint's metadata (val_split: each site sends how it split its data with its updates; the server keeps
it), rebuilt with the one function the sites use (nvflare_lora.data.site_datasets). A site's data that is not
on this machine (a production site's private folder) cannot be used: then the digits are, and said so.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

from nvflare_lora.data import ImageDataset, site_datasets
from nvflare_lora.preprocessing import check_split_record


def run_validation_set(metadata: Mapping, preprocess, classes=None) -> Tuple[Optional[ImageDataset], str]:
    """(dataset or None, a sentence saying what it is or why it could not be rebuilt). classes: the model's
    labels, in its order (an image folder's class folders are matched to them by name)."""
    splits = metadata.get("val_split") or {}
    if not splits:
        return None, "the checkpoint records no site's data split"
    items, classes_seen, sources = [], None, set()
    for site, record in sorted(splits.items()):
        try:
            record = check_split_record(record, site)  # what a site sent: read only as the check allows
            _, val, whole = site_datasets(record, preprocess, classes)
        except (OSError, ValueError) as e:
            return None, f"{site}'s data {record.get('data')!r} cannot be read here ({e})"
        items += val.items
        classes_seen = whole.classes
        sources.add(record["data"] if not record.get("simulated") else
                    f"{record['data']} ({record['partition']} split)")
    return ImageDataset(items, classes_seen, preprocess), (
        f"the sites' validation images ({len(splits)} sites: {'; '.join(sorted(sources))}, "
        f"val_fraction {next(iter(splits.values()))['val_fraction']})")
