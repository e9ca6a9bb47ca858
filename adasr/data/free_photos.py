"""A free real-photo data set for users without DIV2K: photographs from Debian's wallpaper and artwork packages.

DIV2K/DIV8K may not be redistributed. Debian bookworm ships about 85 real photographs (landscapes, plants, animals,
objects; 1.5 to 20 megapixels, mostly high-quality JPEG) in packages under free licences, downloadable with
``apt-get download`` on any Debian or Ubuntu machine. :func:`assemble` turns them into

* ``train/HR/``: the photographs not used for testing, original bytes (for ``prepare_div2k``-style sub-images);
* ``Test4K/{HR,LR}/X4/``: every landscape photo of at least 3840x2160, centre-cropped to 3840x2160, with its MATLAB
  bicubic x1/4 LR (960x540) - a stand-in for Test4K;
* ``Test2K/{HR,LR}/X4/``: the same crops, MATLAB bicubic x1/2 (1920x1080), and their x1/4 LR (480x270);
* ``manifest.csv``: package, version, path in the package, size, licence and sha256 of every file.

The test photos are kept out of ``train`` (no train/test overlap). Licences vary per file (GPL, LGPL, CC-BY,
CC-BY-SA, CC0, public domain, BSD): see the manifest, and do not redistribute the files without following them.
"""
import csv
import hashlib
import io
import os
import os.path as osp
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from adasr.data.prepare import div8k_test_pair
from adasr.utils.files import atomic_write_bytes
from adasr.utils.image_io import write_image


@dataclass(frozen=True)
class Photo:
    package: str
    path: str  # inside the package
    licence: str
    embedded: bool = False  # an Enlightenment .edj archive: take its largest JPEG


def _catalogue() -> List[Photo]:
    out: List[Photo] = []
    plasma = 'LGPL-3.0 (per-wallpaper metadata; Debian copyright: GPL-2+)'
    for n in ('BytheWater', 'ColdRipple', 'ColorfulCups', 'DarkestHour', 'EveningGlow', 'FallenLeaf', 'Grey', 'Kite',
              'OneStandsOut', 'Path', 'summer_1am'):
        out.append(Photo('plasma-workspace-wallpapers', f'/usr/share/wallpapers/{n}/contents/images/2560x1600.jpg',
                         plasma))
    for n in ('Aqua', 'Blinds', 'Dune', 'FreshFlower', 'Garden', 'GreenMeadow', 'LadyBird', 'RainDrops', 'Storm',
              'TwoWings', 'Wood', 'YellowFlower'):
        out.append(Photo('mate-backgrounds', f'/usr/share/backgrounds/mate/nature/{n}.jpg', 'GPL-2+'))
    lomiri = {
        'Bridge_by_Sander_Klootwijk': 'CC-BY-SA-4.0', 'Dragonfly_by_Bolly': 'CC-BY-SA-4.0',
        'Picture_0B_by_freespace': 'CC-BY-4.0', 'Picture_1A_by_freespace': 'CC-BY-4.0',
        'Wine_by_Jakkub_Mede': 'CC-BY-4.0', 'aitzgorri_by_Aitzol_Berasategi': 'CC-BY-4.0',
        'analogpattern_by_Peter_Nerlich': 'CC-BY-SA-4.0', 'free_by_Peter_Nerlich': 'CC-BY-SA-4.0',
        'friends_by_Aitzol_Berasategi': 'CC-BY-4.0', 'greentock_by_Peter_Nerlich': 'CC-BY-SA-4.0',
        'life_by_Aitzol_Berasategi': 'CC-BY-4.0', 'picosdeeuropa_by_Aitzol_Berasategi': 'CC-BY-4.0',
        'seeding_by_Clements_Engelhardt': 'CC0-1.0', 'sunset_by_Aitzol_Berasategi': 'CC-BY-4.0',
    }
    for n, lic in lomiri.items():
        out.append(Photo('lomiri-wallpapers-16.04', f'/usr/share/backgrounds/{n}.jpg', lic))
    out.append(Photo('lomiri-wallpapers-20.04', '/usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg', 'CC-BY-SA-3.0'))
    for n in ('Butterfly-Kenneth-Wimer.jpg', 'Valendas.png', 'after-the-rain.jpg', 'appleflower.png', 'beam.png',
              'butterfly.png', 'cloud.png', 'drop.png', 'flowers.png', 'fog.jpg', 'this-is-not-windows.jpg'):
        out.append(Photo('lxqt-themes', f'/usr/share/lxqt/wallpapers/{n}', 'LGPL-2.1+ (Debian copyright, Files: *)'))
    for i in range(12):
        out.append(Photo('tuxtype-data', f'/usr/share/tuxtype/images/kcas{i}.jpg', 'GPL-2 (package)'))
    for n in ('cliff', 'rocks', 'sun_behind_clouds'):
        out.append(Photo('tuxpaint-data', f'/usr/share/tuxpaint/templates/{n}.jpg', 'GPL-2+ (package)'))
    palapeli = {'castle-maintenon': 'GFDL', 'cincinnati-bridge': 'Public Domain', 'citrus-fruits': 'Public Domain',
                'european-honey-bee': 'Public Domain', 'panther-chameleon-female': 'GFDL'}
    for n, lic in palapeli.items():
        out.append(Photo('palapeli-data', f'/usr/share/palapeli/collection/{n}.jpg', lic))
    out.append(Photo('digikam-data', '/usr/share/digikam/about/images/body-background.jpg', 'GPL-2+ (package)'))
    for n in ('Bamboo', 'Foggy-Trees', 'God-Rays', 'Green-Maple', 'Lichen-Branches', 'Mountain', 'Peaks', 'Red-Maple',
              'Sea-of-Lanterns', 'Snow-Trees', 'Spruce-Needles', 'Sunset-Clouds', 'White-Flower', 'Yellow-Flower'):
        out.append(Photo('enlightenment-data', f'/usr/share/enlightenment/data/backgrounds/{n}.edj',
                         'BSD-2-Clause (Debian copyright, Files: *)', embedded=True))
    return out


#: The curated photographs (real photos only; no renderings or drawings), for Debian bookworm.
CATALOGUE: Tuple[Photo, ...] = tuple(_catalogue())
PACKAGES: Tuple[str, ...] = tuple(dict.fromkeys(p.package for p in CATALOGUE))


def output_name(photo: Photo) -> str:
    """``<package>__<name>.<ext>``; Plasma's ``<name>/contents/images/2560x1600.jpg`` becomes ``<name>.jpg`` and an
    ``.edj`` archive ``<name>.jpg``."""
    parts = photo.path.strip('/').split('/')
    if '/contents/images/' in photo.path:
        stem, ext = parts[parts.index('contents') - 1], osp.splitext(photo.path)[1]
    else:
        stem, ext = osp.splitext(parts[-1])
    if photo.embedded:
        ext = '.jpg'
    return f'{photo.package}__{stem}{ext}'


def largest_embedded_jpeg(data: bytes) -> bytes:
    """The largest decodable JPEG stream inside ``data`` (Enlightenment's .edj archives keep several renditions)."""
    best: Optional[Tuple[int, bytes]] = None
    start = 0
    while True:
        soi = data.find(b'\xff\xd8\xff', start)
        if soi < 0:
            break
        eoi = data.find(b'\xff\xd9', soi)
        found = None
        while eoi > 0:
            img = cv2.imdecode(np.frombuffer(data[soi:eoi + 2], np.uint8), cv2.IMREAD_UNCHANGED)
            if img is not None:
                found = (img.shape[0] * img.shape[1], data[soi:eoi + 2])
                break
            eoi = data.find(b'\xff\xd9', eoi + 2)
        if found:
            if best is None or found[0] > best[0]:
                best = found
            start = soi + len(found[1])
        else:
            start = soi + 3
    if best is None:
        raise ValueError('no decodable JPEG inside the archive')
    return best[1]


def download(packages: Sequence[str], deb_dir: str, pkg_dir: str, log: Callable[[str], None] = print) -> Dict:
    """``apt-get download`` each package into ``deb_dir`` (skipped when a .deb is there) and unpack it with
    ``dpkg-deb -x`` into ``pkg_dir/<package>``. Returns {package: version}."""
    os.makedirs(deb_dir, exist_ok=True)
    versions = {}
    for pkg in packages:
        debs = sorted(f for f in os.listdir(deb_dir) if f.startswith(pkg + '_') and f.endswith('.deb'))
        if not debs:
            log(f'apt-get download {pkg}')
            proc = subprocess.run(['apt-get', 'download', pkg], cwd=deb_dir, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f'apt-get download {pkg} failed (run "apt-get update" first?): '
                                   f'{proc.stderr.strip()[-500:]}')
            debs = sorted(f for f in os.listdir(deb_dir) if f.startswith(pkg + '_') and f.endswith('.deb'))
        deb = osp.join(deb_dir, debs[-1])
        target = osp.join(pkg_dir, pkg)
        if not osp.isfile(osp.join(target, '.version')):
            os.makedirs(target, exist_ok=True)
            subprocess.run(['dpkg-deb', '-x', deb, target], check=True)
            version = subprocess.run(['dpkg-deb', '-f', deb, 'Version'], check=True, capture_output=True,
                                     text=True).stdout.strip()
            with open(osp.join(target, '.version'), 'w') as f:
                f.write(version + '\n')
        versions[pkg] = open(osp.join(target, '.version')).read().strip()
    return versions


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def assemble(pkg_dir: str, out_dir: str, catalogue: Sequence[Photo] = CATALOGUE, crop: Tuple[int, int] = (3840, 2160),
             versions: Optional[Dict[str, str]] = None, log: Callable[[str], None] = print) -> Dict[str, int]:
    """Write ``train/HR``, ``Test4K`` and ``Test2K`` (``{HR,LR}/X4``) and ``manifest.csv`` under ``out_dir`` from
    the unpacked packages in ``pkg_dir/<package>/``. ``crop`` = (width, height) of the 4K crops. Existing outputs
    are kept (resumable). Returns the number of files per set."""
    versions = versions or {}
    cw, ch = crop
    if cw % 8 or ch % 8:
        raise ValueError(f'crop sides must be multiples of 8 (x1/2 then x1/4), got {cw}x{ch}')
    rows: List[List] = []
    counts = {'train': 0, 'Test4K': 0, 'Test2K': 0}
    missing = []
    for photo in catalogue:
        src = osp.join(pkg_dir, photo.package, photo.path.lstrip('/'))
        if not osp.isfile(src):
            missing.append(f'{photo.package}:{photo.path}')
            continue
        name = output_name(photo)
        data = open(src, 'rb').read()
        if photo.embedded:
            data = largest_embedded_jpeg(data)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f'cannot decode {src}')
        h, w = img.shape[:2]
        version = versions.get(photo.package, '')
        if w >= h and w >= cw and h >= ch:
            stem = osp.splitext(name)[0] + '.png'
            top, left = (h - ch) // 2, (w - cw) // 2
            hr4k = np.ascontiguousarray(img[top:top + ch, left:left + cw])
            for set_name, factor, how in (('Test4K', 1, 'centre crop'), ('Test2K', 0.5, 'centre crop, x1/2')):
                hr_path = osp.join(out_dir, set_name, 'HR', 'X4', stem)
                lr_path = osp.join(out_dir, set_name, 'LR', 'X4', stem)
                if osp.isfile(hr_path) and osp.isfile(lr_path):  # a resumed run: nothing to recompute
                    hr_h, hr_w = cv2.imread(hr_path, cv2.IMREAD_UNCHANGED).shape[:2]
                else:
                    hr, lr = div8k_test_pair(hr4k, factor)  # the Test2K/4K/8K protocol: HR, then its x1/4 LR
                    write_image(hr_path, hr, compress_level=3)
                    write_image(lr_path, lr, compress_level=3)
                    hr_h, hr_w = hr.shape[:2]
                rows.append([set_name, stem, photo.package, version, f'{photo.path} [{how}]', hr_w, hr_h,
                             photo.licence, _sha256(hr_path)])
                counts[set_name] += 1
            continue
        dst = osp.join(out_dir, 'train', 'HR', name)
        if not osp.isfile(dst):
            atomic_write_bytes(dst, data)
        rows.append(['train', name, photo.package, version, photo.path + (' [largest JPEG]' if photo.embedded else ''),
                     w, h, photo.licence, _sha256(dst)])
        counts['train'] += 1
    if missing:
        log(f'not found in the unpacked packages ({len(missing)}): {", ".join(missing[:5])}'
            + (' ...' if len(missing) > 5 else ''))
    if not rows:  # nothing unpacked (e.g. --no-download after the packages were removed): keep what is there
        raise RuntimeError(f'none of the catalogued photos is in the unpacked packages under {pkg_dir}; nothing was '
                           f'written and {osp.join(out_dir, "manifest.csv")} is unchanged (download the packages '
                           'again: run without --no-download)')
    os.makedirs(out_dir, exist_ok=True)
    text = io.StringIO(newline='')
    wr = csv.writer(text)
    wr.writerow(['set', 'file', 'package', 'version', 'source_path', 'width', 'height', 'licence', 'sha256'])
    wr.writerows(rows)
    atomic_write_bytes(osp.join(out_dir, 'manifest.csv'), text.getvalue().encode('utf-8'))
    return counts


def remove_downloads(deb_dir: str, pkg_dir: str) -> None:
    for d in (deb_dir, pkg_dir):
        if osp.isdir(d):
            shutil.rmtree(d)
