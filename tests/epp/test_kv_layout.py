"""`--kv-index-layout`: the picker keeps its KV index in dicts (the default: faster lookups and
ingestion) or packed (about a third of the memory per (block, pod)); both answer alike."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from infergw.epp.datastore import Datastore
from infergw.epp.kv_events import KVCacheView, KVEventOptions
from infergw.epp.options import parse_options
from infergw.kvindex.dict_index import DictBlockIndex
from infergw.kvindex.index import KVBlockIndex
from tests.conftest import free_port

POD = "10.0.0.1:8000"


def test_the_default_layout_is_dicts_and_packed_is_a_flag(capsys):
    pool = ["--pool-name", "p"]
    assert parse_options(pool).kv_index_layout == "dict"
    assert parse_options([*pool, "--kv-index-layout", "packed"]).kv_index_layout == "packed"
    with pytest.raises(SystemExit):
        parse_options([*pool, "--kv-index-layout", "zip"])
    assert "--kv-index-layout" in capsys.readouterr().err


@pytest.mark.parametrize(("layout", "kind"), [("dict", DictBlockIndex), ("packed", KVBlockIndex)])
async def test_the_view_keeps_its_index_in_the_chosen_layout(layout, kind):
    opts = KVEventOptions(bind=f"tcp://127.0.0.1:{free_port()}", layout=layout)
    view = KVCacheView(Datastore(), opts, CollectorRegistry())
    try:
        index = view.translator.index
        assert type(index) is kind
        index.add(POD, [11, 12, 13], "gpu")
        assert index.match_lengths([11, 12, 13, 14], [POD]) == {POD: 3}
    finally:
        await view.close()
