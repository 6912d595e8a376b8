"""Generated captioned image folders (colored shapes, see `refiners.training.sample_data`), shared by the training
tests.

The folders are built once per session and must not be modified by tests: a test that needs to break a folder
builds its own with `make_image_folder`.
"""

import pytest

from refiners.training.sample_data import FolderConvention, SampleImageFolder, make_image_folder


def _make(factory: pytest.TempPathFactory, convention: FolderConvention, subfolders: bool) -> SampleImageFolder:
    path = factory.mktemp(f"{convention}{'_nested' if subfolders else ''}")
    return make_image_folder(path, n=24, size=40, convention=convention, subfolders=subfolders)


@pytest.fixture(scope="session")
def metadata_folder(tmp_path_factory: pytest.TempPathFactory) -> SampleImageFolder:
    """24 images of 40 x 40, 40 x 30 and 30 x 40 pixels in the Hugging Face imagefolder layout: one metadata.jsonl."""
    return _make(tmp_path_factory, "metadata", subfolders=False)


@pytest.fixture(scope="session")
def sidecar_folder(tmp_path_factory: pytest.TempPathFactory) -> SampleImageFolder:
    """24 images, each with a .txt caption beside it."""
    return _make(tmp_path_factory, "sidecar", subfolders=False)


@pytest.fixture(scope="session", params=["metadata", "sidecar"])
def nested_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SampleImageFolder:
    """24 images in subfolders named after their shape, in each convention."""
    return _make(tmp_path_factory, request.param, subfolders=True)


@pytest.fixture(params=["metadata", "sidecar"])
def image_folder(
    request: pytest.FixtureRequest, metadata_folder: SampleImageFolder, sidecar_folder: SampleImageFolder
) -> SampleImageFolder:
    """The flat folder of each convention."""
    return metadata_folder if request.param == "metadata" else sidecar_folder
