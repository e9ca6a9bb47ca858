"""Dataset preparation helpers used by ``scripts/data_preparation`` (argparse CLIs) and the tests."""
import json
import math
import os
import os.path as osp
import shutil
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from adasr.utils.files import atomic_write_bytes, remove_orphan_temporaries
from adasr.utils.image_io import IMAGE_EXTENSIONS, read_uint8, write_image
from adasr.utils.matlab_resize import imresize_uint8


def list_images(folder: str, recursive: bool = False) -> List[str]:
    """Image paths relative to ``folder``, sorted."""
    if not osp.isdir(folder):
        raise FileNotFoundError(f'folder does not exist: {folder}')
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                out.append(osp.relpath(osp.join(root, f), folder))
        if not recursive:
            break
    return sorted(out)


def file_stems(paths: List[str], strip_suffix: Optional[str] = None) -> List[str]:
    """The file names without extension (and without ``strip_suffix``, e.g. ``x4`` of DIV2K's ``0001x4.png``), which
    name the outputs made from them; two files with one stem (``0001.png`` and ``0001.jpg``) are an error naming
    both: their outputs would overwrite each other."""
    stems = []
    for p in paths:
        stem = osp.splitext(osp.basename(p))[0]
        if strip_suffix and stem.endswith(strip_suffix):
            stem = stem[:-len(strip_suffix)]
        stems.append(stem)
    dup = [k for k, n in Counter(stems).items() if n > 1]
    if dup:
        clashes = '; '.join(' and '.join(p for p, k in zip(paths, stems) if k == d) for d in sorted(dup)[:3])
        without = 'their extension' + (f' and {strip_suffix}' if strip_suffix else '')
        raise ValueError(f'file names must be unique without {without} (the outputs are named by it): {clashes}'
                         f'{" ..." if len(dup) > 3 else ""}')
    return stems


def lmdb_keys(paths: List[str], strip_suffix: Optional[str] = None) -> List[str]:
    """LMDB keys: :func:`file_stems` (so that LR and HR keys match as ``PairedImageDataset`` requires), without a
    dot: BasicSR reads the keys of ``meta_info.txt`` up to the first ``.`` (``img.v1.png`` would be read as ``img``
    and never found)."""
    keys = file_stems(paths, strip_suffix)
    dotted = [p for p, k in zip(paths, keys) if '.' in k]
    if dotted:
        raise ValueError(f'LMDB keys are the file names without extension and BasicSR reads them up to the first '
                         f'dot: rename {", ".join(dotted[:5])}{" ..." if len(dotted) > 5 else ""} (no dot before the '
                         'extension)')
    return keys


def _raw_bytes(path: str) -> int:
    """An upper bound of an image's decoded size in bytes (from its header; PNG at any level stays below it by a
    few hundred bytes), or 10x the file size when the header does not read. Two bytes a sample unless JPEG (Pillow
    opens a 16-bit RGB PNG as 8-bit RGB; OpenCV, which the LMDB writer reads with, keeps 16 bits)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            wide = im.mode.startswith('I;16') or im.mode in ('I', 'F')
            depth = 4 if wide else 1 if im.format == 'JPEG' else 2
            return w * h * max(len(im.getbands()), 3) * depth + 4096
    except Exception:  # noqa: BLE001 - an undecodable file is named by the writer's failure
        return 10 * osp.getsize(path)


def folder_to_lmdb(folder: str, lmdb_path: str, strip_suffix: Optional[str] = None, overwrite: bool = False,
                   compress_level: int = 1) -> Tuple[int, str]:
    """Write every image of ``folder`` into a BasicSR LMDB (``data.mdb`` + ``meta_info.txt``).

    Uses BasicSR's ``make_lmdb_from_imgs`` (keys are file names without extension) with a map size computed from
    all files rather than from the first one. Returns (number of images, lmdb path).
    """
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs

    if not lmdb_path.endswith('.lmdb'):
        raise ValueError(f"the LMDB path must end with '.lmdb': {lmdb_path}")
    paths = list_images(folder)
    if not paths:
        raise ValueError(f'no images in {folder}')
    if osp.exists(lmdb_path) and not overwrite:
        raise FileExistsError(f'{lmdb_path} exists; pass --overwrite to replace it')
    if osp.exists(lmdb_path) and not osp.isfile(osp.join(lmdb_path, 'data.mdb')):
        raise ValueError(f'{lmdb_path} exists and is not an LMDB (no data.mdb in it); --overwrite replaces only an '
                         'LMDB: move it away first')
    keys = lmdb_keys(paths, strip_suffix)
    # the decoded sizes bound the PNG re-encoding (a JPEG folder can grow 20x; the map is virtual memory and the
    # file grows only as written)
    map_size = max(int(1.05 * sum(_raw_bytes(osp.join(folder, p)) for p in paths)), 1 << 26)
    # built under a temporary name and renamed when complete, so an existing LMDB path always means a finished one
    # (basicsr writes meta_info.txt before the images, so its presence proves nothing)
    partial = lmdb_path[:-len('.lmdb')] + '.partial.lmdb'
    if osp.exists(partial):
        shutil.rmtree(partial)
    os.makedirs(osp.dirname(osp.abspath(lmdb_path)), exist_ok=True)
    try:
        make_lmdb_from_imgs(folder, partial, paths, keys, compress_level=compress_level, map_size=map_size)
    except Exception:
        shutil.rmtree(partial, ignore_errors=True)
        bad = _undecodable(folder, paths)  # looked for only now: a good folder is not decoded twice
        if bad is None:
            raise
        raise ValueError(f'{osp.join(folder, bad)}: cannot be decoded as an image (truncated or not an image); '
                         'no LMDB was written') from None
    if osp.exists(lmdb_path):
        shutil.rmtree(lmdb_path)
    os.replace(partial, lmdb_path)
    return len(paths), lmdb_path


def _remove_orphans(folders: Sequence[str]) -> None:
    """Delete the temporary files that killed runs left under ``folders`` (their images, ``.done`` and ``.sources``
    records): only adasr's own, only once no writer holds them (:func:`adasr.utils.files.remove_orphan_temporaries`).
    """
    for folder in folders:
        remove_orphan_temporaries(folder, recursive=True)


def _check_separate(inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """No output folder is an input folder (its files would be mixed with the user's images), and no two outputs
    are one folder (the files of one would replace the other's under the same names)."""
    ins = {osp.realpath(p): p for p in inputs}
    outs: Dict[str, str] = {}
    for out in outputs:
        if osp.realpath(out) in ins:
            raise ValueError(f'the output folder {out} is the input folder {ins[osp.realpath(out)]}: write into '
                             'another folder')
        if osp.realpath(out) in outs:
            raise ValueError(f'the output folders {outs[osp.realpath(out)]} and {out} are one folder: the files of '
                             'one would replace the other\'s; give each its own folder')
        outs[osp.realpath(out)] = out


def _undecodable(folder: str, paths: Sequence[str]) -> Optional[str]:
    """The first of ``paths`` (relative to ``folder``) that OpenCV cannot decode, or None."""
    import cv2

    for p in paths:
        img = cv2.imread(osp.join(folder, p), cv2.IMREAD_UNCHANGED)
        if img is None or img.size == 0:
            return p
    return None


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so that height and width are multiples of ``scale`` (BasicSR's ``mod_crop``)."""
    h, w = img.shape[:2]
    return img[:h - h % scale, :w - w % scale]


def bicubic_resize(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB ``imresize(img, scale, 'bicubic')`` of a uint8 (H, W) or (H, W, C) image, rounded to uint8: an alias of
    :func:`adasr.utils.matlab_resize.imresize_uint8` (which also bounds the memory of very large images)."""
    return imresize_uint8(img, scale)


def bicubic_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """The classic bicubic LR of an HR image: mod-crop to ``scale``, then MATLAB bicubic by ``1/scale``
    (how DIV2K's and the benchmark sets' LR images were made)."""
    return bicubic_resize(mod_crop(hr, scale), 1 / scale)


def _run_jobs(fn: Callable, jobs: Sequence, n_workers: int, desc: str, progress: bool) -> 'StepReport':
    """Run ``fn(job)`` for every job with a progress bar, in ``n_workers`` processes when more than one. ``fn``
    returns the number of files it wrote, or -1 when the job was already done; the counts make the report."""
    bar = tqdm(total=len(jobs), desc=desc, unit='img', disable=not progress)
    report = StepReport()

    def add(res: int) -> None:
        report.add(res >= 0, max(res, 0))
        bar.update(1)

    try:
        if n_workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                add(fn(job))
        else:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=n_workers) as pool:
                for res in pool.map(fn, jobs, chunksize=1):
                    add(res)
    finally:
        bar.close()
    return report


@dataclass
class StepReport:
    """What a preparation step did: images processed and skipped (already done), files written."""

    processed: int = 0
    skipped: int = 0
    written: int = 0

    def add(self, done: bool, written: int) -> None:
        if done:
            self.processed += 1
        else:
            self.skipped += 1
        self.written += written

    def __str__(self) -> str:
        return f'{self.processed} images processed, {self.skipped} already done, {self.written} files written'


# ---------------------------------------------------------------------------------------------------------------------
# Bicubic LR images (DIV2K / Flickr2K when only the HR images are at hand)
# ---------------------------------------------------------------------------------------------------------------------


def lr_name(name: str, scale: int, suffix_template: str = '') -> str:
    """LR file name for the HR file ``name``: ``suffix_template`` (e.g. ``'x{scale}'``, DIV2K's ``0001x4.png``) is
    appended to the stem; the extension becomes ``.png``."""
    stem = osp.splitext(osp.basename(name))[0]
    return stem + suffix_template.format(scale=scale) + '.png'


SOURCES = '.sources'  #: per output folder: ``<output file>.json``, the source file it was made from


def _source_record(out: str) -> str:
    return osp.join(osp.dirname(out), SOURCES, osp.basename(out) + '.json')


def _source_id(src: str) -> Dict:
    st = os.stat(src)
    return {'path': osp.realpath(src), 'size': st.st_size, 'mtime_ns': st.st_mtime_ns}


def _is_made_from(out: str, src: str) -> bool:
    """Whether ``out`` exists and was made from ``src`` as it is now (its record in ``<folder>/.sources/``). An
    output without a record (written by an older adasr) counts as made; one whose record names another file, or the
    same file changed since, is made again: a re-run from a corrected input (another folder, a re-downloaded set)
    does not keep outputs of the old one."""
    if not osp.isfile(out):
        return False
    record = _source_record(out)
    if not osp.isfile(record):
        return True
    try:
        with open(record) as f:
            return json.load(f) == _source_id(src)
    except (OSError, ValueError):
        return False


def _write_from(out: str, img: np.ndarray, src: str) -> None:
    """Write ``out`` (atomically) and then its source record."""
    write_image(out, img, compress_level=3)
    record = _source_record(out)
    os.makedirs(osp.dirname(record), exist_ok=True)
    atomic_write_bytes(record, json.dumps(_source_id(src)).encode())


def _lr_job(job) -> int:
    src, outputs = job
    todo = [(s, p) for s, p in outputs if not _is_made_from(p, src)]
    if not todo:
        return -1
    hr = read_uint8(src)
    for s, p in todo:
        if min(hr.shape[:2]) < s:
            raise ValueError(f'{src} is {hr.shape[0]}x{hr.shape[1]}: too small for an x{s} LR image')
        _write_from(p, bicubic_lr(hr, s), src)
    return len(todo)


def generate_bicubic_lr(hr_folder: str, out_folders: Mapping[int, str], suffix_template: str = '',
                        n_workers: int = 1, progress: bool = True) -> StepReport:
    """MATLAB-bicubic LR images of every image in ``hr_folder`` for each ``scale -> output folder``.

    HR images whose sides are not multiples of the scale are mod-cropped first. Existing outputs made from the same
    source file are kept, so an interrupted run resumes where it stopped; one made from another file (or from this
    one before it changed) is made again (:func:`_is_made_from`).
    """
    _check_separate([hr_folder], list(out_folders.values()))
    _remove_orphans(list(out_folders.values()))
    names = list_images(hr_folder)
    if not names:
        raise ValueError(f'no images in {hr_folder}')
    file_stems(names)  # 0001.png and 0001.jpg would both make 0001.png
    for s in out_folders:
        if not isinstance(s, int) or s < 2:
            raise ValueError(f'scales must be integers >= 2, got {s!r}')
    jobs = [(osp.join(hr_folder, n), [(s, osp.join(d, lr_name(n, s, suffix_template)))
                                      for s, d in sorted(out_folders.items())]) for n in names]
    return _run_jobs(_lr_job, jobs, n_workers, 'bicubic LR', progress)


# ---------------------------------------------------------------------------------------------------------------------
# Sub-images for training (BasicSR's extract_subimages, paired)
# ---------------------------------------------------------------------------------------------------------------------


def subimage_positions(length: int, crop_size: int, step: int, thresh_size: int = 0) -> List[int]:
    """Start offsets of the crops along one side, BasicSR's rule: ``0, step, 2*step, ...`` while the crop fits,
    plus one crop flush with the end when more than ``thresh_size`` pixels would otherwise be left over.

    A side shorter than ``crop_size`` gives no crop.
    """
    if crop_size <= 0 or step <= 0 or thresh_size < 0:
        raise ValueError(f'crop_size and step must be positive and thresh_size >= 0, got {crop_size}, {step}, '
                         f'{thresh_size}')
    if length < crop_size:
        return []
    pos = list(range(0, length - crop_size + 1, step))
    if length - (pos[-1] + crop_size) > thresh_size:
        pos.append(length - crop_size)
    return pos


def subimage_name(stem: str, index: int) -> str:
    """``0001`` and 1 give ``0001_s001.png`` (BasicSR's naming; the index counts row-major from 1)."""
    return f'{stem}_s{index:03d}.png'


def _find_lr(folder: str, stem: str, scale: int, alt_stem: Optional[str] = None) -> str:
    stems = [stem] if not alt_stem or alt_stem == stem else [alt_stem, stem]
    for cand in [c for st in stems for c in (st, f'{st}x{scale}', f'{st}X{scale}')]:
        for ext in ('.png', '.PNG', '.bmp', '.jpg', '.tif'):
            p = osp.join(folder, cand + ext)
            if osp.isfile(p):
                return p
    raise FileNotFoundError(f'no LR image for {stem} (x{scale}) in {folder}: expected {stem}.png or '
                            f'{stem}x{scale}.png')


def _subimage_job(job) -> int:
    (hr_path, stem, hr_out, lr_jobs, crop_size, step, thresh_size, compress_level) = job
    # the expected outputs are known only after reading the size; a done-marker keeps re-runs cheap. It records the
    # crop settings and the LR outputs made: other settings are refused (their crops would be mixed with these),
    # a scale added later is cut from the same positions (the HR crops are kept)
    marker = osp.join(hr_out, '.done', stem)
    settings = {'crop_size': crop_size, 'step': step, 'thresh_size': thresh_size}
    record = _read_marker(marker, settings, hr_out, [osp.abspath(o) for _, _, o in lr_jobs])
    made = None if record is None else record['lr_outputs']
    grid = math.lcm(*[s for s, _, _ in lr_jobs])
    if record is not None:
        lr_jobs = [j for j in lr_jobs if osp.abspath(j[2]) not in made]
        if not lr_jobs:
            return -1
        # the positions of the kept HR crops: a new scale must divide the grid they were cut on
        grid = record.get('grid') or grid
        for s, _, _ in lr_jobs:
            if grid % s:
                raise ValueError(f'{hr_out} was cut for scales whose positions do not fit x{s} (grid {grid}): cut '
                                 f'all scales again into new folders, or x{s} alone into its own HR folder')
    hr = read_uint8(hr_path)
    h, w = hr.shape[:2]
    hg, wg = h - h % grid, w - w % grid  # crop positions on the HR cut to a multiple of every scale
    ys = subimage_positions(hg, crop_size, step, thresh_size)
    xs = subimage_positions(wg, crop_size, step, thresh_size)
    lrs = []
    for s, lr_folder, lr_out in lr_jobs:
        lr_path = _find_lr(lr_folder, stem, s, osp.splitext(osp.basename(hr_path))[0])
        lr = read_uint8(lr_path)
        lh, lw = lr.shape[:2]
        if not (h // s <= lh <= -(-h // s) and w // s <= lw <= -(-w // s)):
            raise ValueError(f'{lr_path} is {lw}x{lh} but its HR {hr_path} is {w}x{h}: not an x{s} pair')
        lrs.append((s, lr, lr_out))
    written = 0
    index = 0
    for y in ys:
        for x in xs:
            index += 1
            name = subimage_name(stem, index)
            if made is None:
                write_image(osp.join(hr_out, name), np.ascontiguousarray(hr[y:y + crop_size, x:x + crop_size]),
                            compress_level=compress_level)
                written += 1
            for s, lr, lr_out in lrs:
                c = crop_size // s
                write_image(osp.join(lr_out, name),
                            np.ascontiguousarray(lr[y // s:y // s + c, x // s:x // s + c]),
                            compress_level=compress_level)
                written += 1
    os.makedirs(osp.dirname(marker), exist_ok=True)
    done = dict(settings, grid=grid, crops=index,
                lr_outputs=sorted(set(made or ()) | {osp.abspath(o) for _, _, o in lrs}))
    atomic_write_bytes(marker, json.dumps(done).encode())
    return written


def _read_marker(marker: str, settings: Mapping, hr_out: str, lr_outs: List[str]) -> Optional[Dict]:
    """A finished image's marker (None: none): the settings, ``grid`` and ``lr_outputs`` (the LR sub-image folders
    made), after checking that it was cut with ``settings``. A marker of an older adasr (the crop count only)
    counts as done for ``lr_outs``."""
    if not osp.isfile(marker):
        return None
    with open(marker) as f:
        text = f.read()
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict):  # the crop count of an older marker
        return {'lr_outputs': lr_outs} if text.strip().isdigit() else None
    old = {k: record.get(k) for k in settings}
    if old != dict(settings):
        raise ValueError(f'{hr_out} holds sub-images cut with {old}, not {dict(settings)}: their crops would be '
                         f'mixed; write into another folder, or delete {hr_out}, its .done folder and the LR '
                         'sub-image folders to cut them again')
    record.setdefault('lr_outputs', [])
    return record


def extract_subimages(hr_folder: str, hr_out: str, lr: Optional[Mapping[int, Tuple[str, str]]] = None,
                      crop_size: int = 480, step: int = 240, thresh_size: int = 0, strip_suffix: str = '',
                      compress_level: int = 3, n_workers: int = 1, progress: bool = True) -> StepReport:
    """Cut every HR image into ``crop_size`` squares every ``step`` pixels, and the matching LR crops.

    BasicSR's standard for DIV2K/DF2K is 480 px crops with step 240 and ``thresh_size`` 0 (the last crop of a row or
    column is moved flush with the border), the LR crops being ``480/s`` with step ``240/s``. Here the LR crops are
    cut at exactly ``1/s`` of the HR positions, so every LR sub-image is the x``s`` partner of the HR sub-image of
    the same name, for every scale at once. Where the HR sides are multiples of every scale (DIV2K, Flickr2K) this is
    exactly what BasicSR's ``extract_subimages.py`` writes; otherwise positions are computed on the HR cut to a
    multiple of all scales so that the pairs stay aligned.

    Args:
        hr_folder: HR images.
        hr_out: output folder of HR sub-images (``<stem>_s001.png``, ...).
        lr: ``{scale: (LR folder, output folder)}``; LR files are found as ``<stem>.png`` or ``<stem>x<s>.png``.
        crop_size, step, thresh_size: on the HR, in pixels; ``crop_size`` and ``step`` must be multiples of every
            scale.
        strip_suffix: removed from HR stems (e.g. ``_HR``) before naming.
        compress_level: PNG compression level of the sub-images (BasicSR uses 3).
        n_workers: processes.

    Each finished image leaves a marker under ``<hr_out>/.done/``; a re-run skips those images (resumable).
    """
    lr = dict(lr or {})
    _check_separate([hr_folder] + [f for f, _ in lr.values()], [hr_out] + [o for _, o in lr.values()])
    _remove_orphans([hr_out] + [o for _, o in lr.values()])
    for s in lr:
        if not isinstance(s, int) or s < 1 or crop_size % s or step % s:
            raise ValueError(f'crop_size {crop_size} and step {step} must be multiples of every scale, got x{s}')
    names = list_images(hr_folder)
    if not names:
        raise ValueError(f'no images in {hr_folder}')
    stems = file_stems(names, strip_suffix or None)
    jobs = [(osp.join(hr_folder, n), stem, hr_out, [(s, f, o) for s, (f, o) in sorted(lr.items())], crop_size,
             step, thresh_size, compress_level) for n, stem in zip(names, stems)]
    return _run_jobs(_subimage_job, jobs, n_workers, 'sub-images', progress)


# ---------------------------------------------------------------------------------------------------------------------
# Benchmark sets (Set5, Set14, B100, Urban100, Manga109): GTmod{s} / LRbicx{s}
# ---------------------------------------------------------------------------------------------------------------------


def _benchmark_job(job) -> int:
    src, stem, outputs, lr_src = job
    given = {s: _find_lr(lr_src[s], stem, s, osp.splitext(osp.basename(src))[0])
             for s, _, _ in outputs if lr_src and lr_src.get(s)}
    todo = [(s, gt, lq) for s, gt, lq in outputs
            if not (_is_made_from(gt, src) and _is_made_from(lq, given.get(s, src)))]
    if not todo:
        return -1
    hr = read_uint8(src)
    for s, gt_path, lq_path in todo:
        if min(hr.shape[:2]) < s:
            raise ValueError(f'{src} is {hr.shape[1]}x{hr.shape[0]}: too small for an x{s} LR image')
        gt = mod_crop(hr, s)
        if s in given:
            lq = read_uint8(given[s])
            if lq.shape[:2] != (gt.shape[0] // s, gt.shape[1] // s):
                raise ValueError(f'the given LR of {src} at x{s} is {lq.shape[1]}x{lq.shape[0]}, expected '
                                 f'{gt.shape[1] // s}x{gt.shape[0] // s} (the HR mod-cropped to {s}, divided by {s})')
        else:
            lq = bicubic_resize(gt, 1 / s)
        _write_from(gt_path, gt, src)
        _write_from(lq_path, lq, given.get(s, src))
    return 2 * len(todo)


def prepare_benchmark_set(hr_folders: Mapping[int, str], out_root: str, lr_folders: Optional[Mapping[int, str]] = None,
                          strip_suffix: str = '', n_workers: int = 1, progress: bool = True) -> StepReport:
    """Write ``<out_root>/GTmod{s}/<name>.png`` (the HR cropped to a multiple of ``s``) and
    ``<out_root>/LRbicx{s}/<name>.png`` (its MATLAB-bicubic x1/s) for each ``scale -> HR folder``.

    Usually every scale reads the same HR folder (the original images); distributions that ship an HR folder per
    scale (already cropped) map each scale to its own. ``lr_folders`` (optional, per scale) copies given LR images
    (e.g. the MATLAB-made files of a distribution) instead of computing them, after checking their size. Grayscale
    images stay grayscale. Existing outputs are kept (resumable).
    """
    jobs: Dict[str, Tuple[str, str, list, dict]] = {}
    for s, folder in sorted(hr_folders.items()):
        if not isinstance(s, int) or s < 2:
            raise ValueError(f'scales must be integers >= 2, got {s!r}')
        names = list_images(folder)
        if not names:
            raise ValueError(f'no images in {folder}')
        for n, stem in zip(names, file_stems(names, strip_suffix or None)):
            key = (osp.join(folder, n), stem)
            job = jobs.setdefault(key, (key[0], stem, [], dict(lr_folders or {})))
            job[2].append((s, osp.join(out_root, f'GTmod{s}', stem + '.png'),
                           osp.join(out_root, f'LRbicx{s}', stem + '.png')))
    _remove_orphans([out_root])
    return _run_jobs(_benchmark_job, list(jobs.values()), n_workers, osp.basename(out_root), progress)


# ---------------------------------------------------------------------------------------------------------------------
# Test2K / Test4K / Test8K from DIV8K (the ClassSR protocol, see docs/datasets.md)
# ---------------------------------------------------------------------------------------------------------------------

#: set name -> (first DIV8K index, last DIV8K index, HR downscaling factor)
DIV8K_TEST_SETS: Dict[str, Tuple[int, int, float]] = {
    'Test2K': (1201, 1300, 1 / 4),
    'Test4K': (1301, 1400, 1 / 2),
    'Test8K': (1401, 1500, 1.0),
}


def div8k_test_pair(img: np.ndarray, hr_factor: float, scale: int = 4) -> Tuple[np.ndarray, np.ndarray]:
    """(HR, LR) of one DIV8K image: HR = MATLAB bicubic by ``hr_factor`` (none for 1) rounded to uint8, cropped
    to a multiple of ``scale``; LR = MATLAB bicubic x1/``scale`` of that HR."""
    hr = img if hr_factor == 1 else bicubic_resize(img, hr_factor)
    hr = mod_crop(hr, scale)
    return hr, bicubic_resize(hr, 1 / scale)


def _div8k_job(job) -> int:
    src, hr_path, lr_path, factor, scale = job
    if _is_made_from(hr_path, src) and _is_made_from(lr_path, src):
        return -1
    img = read_uint8(src)
    if min(img.shape[:2]) * factor < scale:
        raise ValueError(f'{src} is {img.shape[1]}x{img.shape[0]}: too small for an x{scale} pair at HR x{factor}')
    hr, lr = div8k_test_pair(img, factor, scale)
    _write_from(hr_path, hr, src)
    _write_from(lr_path, lr, src)
    return 2


def find_div8k_image(folder: str, index: int) -> Optional[str]:
    for ext in ('.png', '.PNG', '.jpg', '.bmp', '.tif'):
        p = osp.join(folder, f'{index:04d}{ext}')
        if osp.isfile(p):
            return p
    return None


def build_div8k_test_sets(div8k_folder: str, out_root: str, sets: Sequence[str] = tuple(DIV8K_TEST_SETS),
                          scale: int = 4, allow_missing: bool = False, n_workers: int = 1,
                          progress: bool = True) -> Dict[str, StepReport]:
    """Write ``<out_root>/<Set>/HR/X4/<index>.png`` and ``<out_root>/<Set>/LR/X4/<index>.png`` for Test2K (DIV8K
    1201-1300, HR = x1/4), Test4K (1301-1400, x1/2) and Test8K (1401-1500, the original), LR = x1/4 of the HR.

    ``div8k_folder`` holds DIV8K's ``1201.png`` ... ``1500.png`` (other images are ignored). A missing image is an
    error naming it unless ``allow_missing``. Finished pairs are skipped on a re-run (resumable).
    """
    if not osp.isdir(div8k_folder):
        raise FileNotFoundError(f'the DIV8K folder {div8k_folder} does not exist')
    out = {}
    for name in sets:
        if name not in DIV8K_TEST_SETS:
            raise ValueError(f'unknown set {name!r}; choose from {list(DIV8K_TEST_SETS)}')
        first, last, factor = DIV8K_TEST_SETS[name]
        jobs, missing = [], []
        for idx in range(first, last + 1):
            src = find_div8k_image(div8k_folder, idx)
            if src is None:
                missing.append(f'{idx:04d}.png')
                continue
            jobs.append((src, osp.join(out_root, name, 'HR', f'X{scale}', f'{idx:04d}.png'),
                         osp.join(out_root, name, 'LR', f'X{scale}', f'{idx:04d}.png'), factor, scale))
        if missing and (not allow_missing or not jobs):  # --allow-missing allows gaps, not an empty set
            raise FileNotFoundError(f'{name} needs DIV8K images {first:04d}-{last:04d} in {div8k_folder}; missing '
                                    f'{len(missing)}: {", ".join(missing[:5])}{" ..." if len(missing) > 5 else ""}')
        _remove_orphans([osp.join(out_root, name)])
        report = _run_jobs(_div8k_job, jobs, n_workers, name, progress)
        out[name] = report
    return out


# ---------------------------------------------------------------------------------------------------------------------
# DIV2K / DF2K for training: LR (if missing) -> sub-images -> LMDBs, with the folder names the option files use
# ---------------------------------------------------------------------------------------------------------------------

#: Training sets, paths relative to the data root (``datasets/``). ``sources``: (HR folder, LR folder per scale) as
#: downloaded; LR folders that are missing or incomplete are generated (MATLAB bicubic, DIV2K file names).
TRAINING_SETS = {
    'DIV2K': {
        'sources': [('DIV2K/DIV2K_train_HR', 'DIV2K/DIV2K_train_LR_bicubic/X{scale}')],
        'hr_sub': 'DIV2K/DIV2K_train_HR_sub',
        'lr_sub': 'DIV2K/DIV2K_train_LR_bicubic/X{scale}_sub',
        'hr_lmdb': 'DIV2K/DIV2K_train_HR_sub.lmdb',
        'lr_lmdb': 'DIV2K/DIV2K_train_LR_bicubic_X{scale}_sub.lmdb',
    },
    'DF2K': {
        'sources': [('DIV2K/DIV2K_train_HR', 'DIV2K/DIV2K_train_LR_bicubic/X{scale}'),
                    ('Flickr2K/Flickr2K_HR', 'Flickr2K/Flickr2K_LR_bicubic/X{scale}')],
        'hr_sub': 'DF2K/DF2K_HR_sub',
        'lr_sub': 'DF2K/DF2K_LR_bicubic/X{scale}_sub',
        'hr_lmdb': 'DF2K/DF2K_HR_sub.lmdb',
        'lr_lmdb': 'DF2K/DF2K_LR_bicubic_X{scale}_sub.lmdb',
    },
}


def prepare_training_set(name: str, root: str, scales: Sequence[int] = (2, 3, 4), crop_size: int = 480,
                         step: int = 240, thresh_size: int = 0, make_lmdb: bool = True, remove_sub: bool = False,
                         n_workers: int = 1, progress: bool = True, log: Callable[[str], None] = print) -> Dict:
    """DIV2K or DF2K from the downloaded folders under ``root`` to the sub-image LMDBs the train option files read.

    Steps (each resumable): 1. MATLAB-bicubic LR for every scale whose LR folder is missing or incomplete (names
    ``0001x4.png`` as in the DIV2K download); 2. paired sub-images (:func:`extract_subimages`, 480/240 by default);
    3. one LMDB per folder (keys ``0001_s001``), skipped when it already exists. ``remove_sub`` deletes the sub-image
    folders once their LMDBs exist. Returns the output paths.
    """
    if name not in TRAINING_SETS:
        raise ValueError(f'unknown training set {name!r}; choose from {list(TRAINING_SETS)}')
    spec = TRAINING_SETS[name]
    scales = sorted(set(int(s) for s in scales))
    hr_sub = osp.join(root, spec['hr_sub'])
    lr_sub = {s: osp.join(root, spec['lr_sub'].format(scale=s)) for s in scales}
    lmdbs = [(hr_sub, osp.join(root, spec['hr_lmdb']))] + [
        (lr_sub[s], osp.join(root, spec['lr_lmdb'].format(scale=s))) for s in scales]
    # with remove_sub, finished LMDBs are all that is wanted: a re-run does not cut (and delete) the sub-images again
    done = make_lmdb and remove_sub and all(osp.exists(path) for _, path in lmdbs)
    for hr_rel, lr_rel in ([] if done else spec['sources']):
        hr_dir = osp.join(root, hr_rel)
        if not osp.isdir(hr_dir):
            raise FileNotFoundError(f'{name} needs {hr_dir} (see docs/datasets.md for the download)')
        n_hr = len(list_images(hr_dir))
        lr_src = {s: osp.join(root, lr_rel.format(scale=s)) for s in scales}
        missing = {s: d for s, d in lr_src.items() if not osp.isdir(d) or len(list_images(d)) < n_hr}
        if missing:
            log(f'[{name}] generating bicubic LR x{sorted(missing)} for {hr_dir}')
            log(f'[{name}]   {generate_bicubic_lr(hr_dir, missing, "x{scale}", n_workers, progress)}')
        log(f'[{name}] sub-images of {hr_dir} -> {hr_sub}')
        report = extract_subimages(hr_dir, hr_sub, {s: (lr_src[s], lr_sub[s]) for s in scales},
                                   crop_size=crop_size, step=step, thresh_size=thresh_size, n_workers=n_workers,
                                   progress=progress)
        log(f'[{name}]   {report}')
    out = {'hr_sub': hr_sub, 'lr_sub': lr_sub}
    if make_lmdb:
        for folder, path in lmdbs:
            if osp.exists(path):  # folder_to_lmdb renames an LMDB into place only when it is complete
                log(f'[{name}] {path} exists, kept')
            else:
                n, _ = folder_to_lmdb(folder, path)
                log(f'[{name}] {path}: {n} images')
            if remove_sub and osp.isdir(folder):
                shutil.rmtree(folder)
        out['hr_lmdb'] = lmdbs[0][1]
        out['lr_lmdb'] = {s: p for s, (_, p) in zip(scales, lmdbs[1:])}
    return out
