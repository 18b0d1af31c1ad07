"""ISPyB for the local Zocalo: grid scans registered through the real ispyb
models and read back as a dispatcher's ISPyB filters give them, on an SQLite
file and on MariaDB; the filters themselves, through a recipe."""

import configparser
import json
import logging
import multiprocessing
import re

import pytest
import sqlalchemy as sa
import workflows.recipe
from sqlalchemy.orm import Session

import zocalo_xrc as zx
from zocalo_xrc.local import ispyb as li
from mariadb import free_port

XY = zx.GridInfo(14, 5, 0.02, 0.02, 1.25, 1.25, 310.0, 215.5, True, "horizontal").to_ispyb()
XZ = zx.GridInfo(14, 8, 0.02, 0.025, 1.25, 1.25, 310.0, 190.0, True, "horizontal").to_ispyb()
KEYS = {
    "ispyb_dcid", "ispyb_dcgid", "ispyb_beamline", "ispyb_visit", "ispyb_dcg_experiment_type",
    "ispyb_image_directory", "ispyb_image_template", "ispyb_sample_id", "ispyb_number_of_images",
    "ispyb_start_image_number", "ispyb_dc_info", "ispyb_dcg_dcids",
}
RECIPE = {
    "1": {
        "service": "DLS X-Ray Centering",
        "queue": "reduce.xray_centering",
        "gridinfo": "{$REPLACE:ispyb_dc_info[gridinfo]}",
        "parameters": {
            "dcid": "{ispyb_dcid}",
            "dcg_dcids": "{$REPLACE:ispyb_dcg_dcids}",
            "beamline": "{ispyb_beamline}",
            "experiment_type": "{ispyb_dcg_experiment_type}",
            "sample_id": "{$REPLACE:ispyb_sample_id}",
            "template": "{ispyb_image_directory}{ispyb_image_template}",
        },
    },
    "start": [[1, []]],
}


@pytest.fixture(autouse=True)
def no_configured_database(monkeypatch):
    """Every test starts with no ISPyB configured for the process."""
    monkeypatch.delenv(li.ENV_URL, raising=False)
    monkeypatch.delenv(li.ENV_CREDENTIALS, raising=False)
    monkeypatch.setattr(li, "_warned_unconfigured", False)
    li.configure(None)
    yield
    li.configure(None)


@pytest.fixture(params=["sqlite", "mariadb"])
def db(request, tmp_path):
    """A database with the ISPyB tables: a fresh SQLite file, or the session's MariaDB."""
    url = f"sqlite:///{tmp_path / 'ispyb.db'}" if request.param == "sqlite" else request.getfixturevalue("mariadb_url")
    with li.Ispyb(url) as handle:
        handle.create_schema()
        yield handle


def scan3d(db, beamline, **kw):
    args = dict(beamline=beamline, grids=[XY, XZ], experiment_type="Mesh3D", sample_id=42,
                image_directory="/dls/i03/data/2026/cm00001-1/xrc/", file_template="xtal_1_master.h5")
    return db.add_scan(**{**args, **kw})


# ---- schema ----


def test_the_schema_is_the_foreign_key_closure_of_the_tables_used_and_made_again_harmlessly(db):
    db.create_schema()
    db.create_schema()
    names = set(sa.inspect(db.engine).get_table_names())
    wanted = {t.name for t in li.schema_tables()}
    assert set(li.TABLES) <= wanted <= names
    assert len(wanted) < 60  # the closure, not all ~200 tables
    columns = {c["name"] for c in sa.inspect(db.engine).get_columns("GridInfo")}
    assert {"dataCollectionId", "dataCollectionGroupId", *li.GRID_KEYS} <= columns


# ---- add_scan and parameters ----


def test_a_3d_scan_reads_back_as_the_dispatcher_filters_give_it(db, unique):
    r = scan3d(db, unique)
    assert isinstance(r, li.RegisteredScan) and r.beamline == unique
    assert re.fullmatch(r"cm\d{5}-1", r.visit)
    assert len(r.dcids) == 2 and r.dcids[0] < r.dcids[1]
    for i, (dcid, grid) in enumerate(zip(r.dcids, [XY, XZ])):
        p = db.parameters(dcid)
        assert set(p) == KEYS
        json.dumps(p)  # JSON as it stands: no datetimes, no Decimals
        assert p["ispyb_dcid"] == dcid and p["ispyb_dcgid"] == r.dcgid
        assert (p["ispyb_beamline"], p["ispyb_visit"]) == (unique, r.visit)
        assert p["ispyb_dcg_experiment_type"] == "Mesh3D"
        assert p["ispyb_image_directory"] == "/dls/i03/data/2026/cm00001-1/xrc/"
        assert p["ispyb_image_template"] == "xtal_1_master.h5"
        assert p["ispyb_sample_id"] == 42
        assert p["ispyb_number_of_images"] == grid["steps_x"] * grid["steps_y"]
        assert p["ispyb_start_image_number"] == (1, 1 + 14 * 5)[i]  # the grids follow each other in one file
        assert p["ispyb_dcg_dcids"] == [r.dcids[1 - i]]
        info = p["ispyb_dc_info"]
        assert zx.GridInfo.from_ispyb(info["gridinfo"]) == zx.GridInfo.from_ispyb(grid)
        assert set(info["gridinfo"]) == set(li.GRID_KEYS)
        assert info["dataCollectionId"] == dcid and info["dataCollectionGroupId"] == r.dcgid
        assert info["axisStart"] == (0.0, 90.0)[i] and info["BLSAMPLEID"] == 42
        assert info["numberOfImages"] == p["ispyb_number_of_images"] and info["runStatus"]
        assert isinstance(info["startTime"], str) and info["dataCollectionNumber"] >= 1
        assert not any(v is None for v in info.values())
    # the beamline's proposal and session are made once and reused; another beamline has its own
    again = scan3d(db, unique)
    assert again.visit == r.visit and again.dcgid > r.dcgid and min(again.dcids) > max(r.dcids)
    other = scan3d(db, unique + "b")
    assert other.visit != r.visit


def test_a_2d_scan_is_a_lone_data_collection(db, unique):
    r = db.add_scan(beamline=unique, grids=[XY], experiment_type="Mesh", sample_id=None,
                    image_directory="/tmp/images/", file_template="xtal_2_master.h5", start_frames=[5])
    assert len(r.dcids) == 1
    p = db.parameters(r.dcids[0])
    assert p["ispyb_dcg_dcids"] == [] and p["ispyb_sample_id"] is None
    assert p["ispyb_dcg_experiment_type"] == "Mesh" and p["ispyb_start_image_number"] == 5
    assert p["ispyb_number_of_images"] == 70 and "BLSAMPLEID" not in p["ispyb_dc_info"]
    assert zx.GridInfo.from_ispyb(p["ispyb_dc_info"]["gridinfo"]) == zx.GridInfo.from_ispyb(XY)


def test_gridinfo_falls_back_to_the_group_as_diamonds_lookup_does(db, unique):
    m = li._models()
    r = db.add_scan(beamline=unique, grids=[XY], experiment_type="Mesh", sample_id=7,
                    image_directory="/tmp/", file_template="t.h5")
    session_id = db.parameters(r.dcids[0])["ispyb_dc_info"]["SESSIONID"]
    group_grid = {**XZ, "orientation": "vertical", "snaked": 0}
    with Session(db.engine) as s, s.begin():
        # an older-style scan: its GridInfo row keyed by the group, not the data collection
        dcg = m.DataCollectionGroup(sessionId=session_id, experimentType="Mesh")
        bare = m.DataCollectionGroup(sessionId=session_id, experimentType="Mesh")
        s.add_all([dcg, bare])
        s.flush()
        dc = m.DataCollection(dataCollectionGroupId=dcg.dataCollectionGroupId, numberOfImages=112)
        lone = m.DataCollection(dataCollectionGroupId=bare.dataCollectionGroupId)
        s.add_all([dc, lone])
        s.add(m.GridInfo(dataCollectionGroupId=dcg.dataCollectionGroupId, **group_grid))
        # a group-keyed row for the registered scan's group too: its own row still wins
        s.add(m.GridInfo(dataCollectionGroupId=r.dcgid, **group_grid))
        s.flush()
        dcid, lone_dcid = dc.dataCollectionId, lone.dataCollectionId
    got = db.parameters(dcid)["ispyb_dc_info"]["gridinfo"]
    assert zx.GridInfo.from_ispyb(got) == zx.GridInfo.from_ispyb(group_grid)
    assert got["orientation"] == "vertical" and got["snaked"] in (0, False)
    assert db.parameters(lone_dcid)["ispyb_dc_info"]["gridinfo"] == {}
    assert zx.GridInfo.from_ispyb(db.parameters(r.dcids[0])["ispyb_dc_info"]["gridinfo"]) == zx.GridInfo.from_ispyb(XY)


def test_an_unknown_dcid_names_the_dcid_and_the_database(db, caplog):
    with pytest.raises(li.UnknownDcidError) as e:
        db.parameters(987654321)
    assert isinstance(e.value, LookupError)
    assert "987654321" in str(e.value) and db.url in str(e.value)
    # the filters: one warning line each, and the request goes on without ISPyB's values (Mimas then says
    # there is nothing to run), not rejected into the dispatcher's requeue-until-dead-lettered loop
    li.configure(db.engine.url.render_as_string(hide_password=False))
    with caplog.at_level(logging.WARNING, logger=li.__name__):
        for f, dcid in ((li.ispyb_dc_info, 987654321), (li.ispyb_dcg_dcids, "987654321")):
            message, parameters = {"recipes": ["mimas"]}, {"ispyb_dcid": dcid}
            assert f(message, parameters) == (message, parameters)
    warnings = [r.getMessage() for r in caplog.records]  # one per request: from the first filter
    assert len(warnings) == 1 and "987654321" in warnings[0] and db.url in warnings[0]
    assert not any(r.exc_info for r in caplog.records)


def test_bad_scans_are_refused_naming_what_is_wrong(tmp_path):
    with li.Ispyb(f"sqlite:///{tmp_path / 'ispyb.db'}") as db:
        db.create_schema()
        ok = dict(beamline="i03", grids=[XY], experiment_type="Mesh", sample_id=None,
                  image_directory="/tmp/", file_template="t.h5")
        missing = {k: v for k, v in XY.items() if k != "dx_mm"}
        for change, words in [
            ({"grids": [XY, missing]}, r"grids\[1\].*'dx_mm'"),
            ({"grids": [{**XY, "snake": True}]}, r"grids\[0\].*unknown key 'snake'"),
            ({"grids": [{**XY, "orientation": "diagonal"}]}, "orientation"),
            ({"grids": [{**XY, "steps_x": 0}]}, "steps_x"),
            ({"grids": []}, "grids is empty"),
            ({"experiment_type": "Mesh4D"}, "experiment_type 'Mesh4D'"),
            ({"start_frames": [1, 2]}, "start_frames has 2 numbers for 1 grids"),
            ({"sample_id": "42"}, "sample_id"),
            ({"beamline": ""}, "beamline"),
        ]:
            with pytest.raises(ValueError, match=words):
                db.add_scan(**{**ok, **change})
        with pytest.raises(ValueError, match="whole number"):
            db.parameters("12")  # type: ignore[arg-type]
        with sa.create_engine(f"sqlite:///{tmp_path / 'ispyb.db'}").connect() as c:
            assert c.exec_driver_sql('SELECT count(*) FROM "DataCollection"').scalar() == 0  # nothing half-written


# ---- the dispatcher filters ----


def test_the_filters_fill_a_recipe_through_apply_parameters(db, unique):
    r = scan3d(db, unique)
    li.configure(db.engine.url.render_as_string(hide_password=False))
    message, parameters = {"recipes": ["xrc"]}, {"ispyb_dcid": str(r.dcids[1]), "guid": "g"}
    for f in (li.ispyb_dc_info, li.ispyb_dcg_dcids):  # as zocalo's Dispatcher calls its filters
        message, parameters = f(message, parameters)
    assert set(parameters) == KEYS | {"guid"} and parameters["ispyb_dcid"] == r.dcids[1]
    recipe = workflows.recipe.Recipe(json.loads(json.dumps(RECIPE)))
    recipe.apply_parameters(parameters)
    step = recipe[1]
    assert zx.GridInfo.from_ispyb(step["gridinfo"]) == zx.GridInfo.from_ispyb(XZ)
    assert step["parameters"] == {
        "dcid": str(r.dcids[1]), "dcg_dcids": [r.dcids[0]], "beamline": unique, "experiment_type": "Mesh3D",
        "sample_id": 42, "template": "/dls/i03/data/2026/cm00001-1/xrc/xtal_1_master.h5",
    }
    # ispyb_dc_info alone fills everything but the group's DCIDs
    _, only_info = li.ispyb_dc_info({}, {"ispyb_dcid": r.dcids[0]})
    assert set(only_info) == KEYS - {"ispyb_dcg_dcids"}
    with pytest.raises(ValueError, match="ispyb_dcid must be a whole number"):
        li.ispyb_dcg_dcids({}, {"ispyb_dcid": "{ispyb_dcid}"})


def test_the_filters_pass_messages_without_a_dcid_or_without_a_database(caplog, tmp_path, monkeypatch):
    message, parameters = {"recipes": ["x"]}, {"guid": "g"}
    for f in (li.ispyb_dc_info, li.ispyb_dcg_dcids):
        m2, p2 = f(message, parameters)
        assert m2 is message and p2 is parameters
    with pytest.raises(li.IspybNotConfiguredError, match=li.ENV_URL):
        li.database_url()
    with caplog.at_level(logging.WARNING, logger=li.__name__):
        for f in (li.ispyb_dc_info, li.ispyb_dcg_dcids, li.ispyb_dc_info):
            for dcid in (5, "not a number"):  # a foreign dispatcher's messages are not ours to judge
                m2, p2 = f(message, {"ispyb_dcid": dcid})
                assert m2 is message and p2 == {"ispyb_dcid": dcid}
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "configure" in warnings[0].getMessage()
    # where the database comes from: configure() first, then the environment
    monkeypatch.setenv(li.ENV_URL, f"sqlite:///{tmp_path / 'env.db'}")
    assert li.database_url().endswith("env.db")
    li.configure(f"sqlite:///{tmp_path / 'configured.db'}")
    assert li.database_url().endswith("configured.db")
    assert li.database() is li.database()  # one handle (one engine) per URL


def test_ispyb_credentials_files_are_read_as_facility_code_does(tmp_path, monkeypatch, mariadb_url, unique):
    url = sa.engine.make_url(mariadb_url)
    config = configparser.ConfigParser()
    config["ispyb_sqlalchemy"] = {"username": url.username, "password": url.password, "host": url.host,
                                  "port": str(url.port), "database": url.database}
    with open(tmp_path / "credentials.cfg", "w") as f:
        config.write(f)
    monkeypatch.setenv(li.ENV_CREDENTIALS, str(tmp_path / "credentials.cfg"))
    assert li.database_url().startswith("mysql+mysqlconnector://")  # ispyb's own driver
    with li.Ispyb(mariadb_url) as db:
        db.create_schema()
        r = scan3d(db, unique)
    _, p = li.ispyb_dcg_dcids({}, {"ispyb_dcid": r.dcids[0]})
    assert p["ispyb_dcg_dcids"] == [r.dcids[1]]
    monkeypatch.setenv(li.ENV_CREDENTIALS, str(tmp_path / "missing.cfg"))
    with pytest.raises(li.IspybError, match="missing.cfg"):
        li.database_url()


# ---- processes ----


def _register(url, beamline, n, out):
    db = li.Ispyb(url)
    out.put([scan3d(db, beamline) for _ in range(n)])


def test_two_processes_register_scans_in_one_database_at_once(db, unique):
    """Two processes register on one new beamline together (both may try to
    make its session: one does); this process reads what they wrote."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    url = db.engine.url.render_as_string(hide_password=False)
    procs = [ctx.Process(target=_register, args=(url, unique, 4, out)) for _ in range(2)]
    for p in procs:
        p.start()
    scans = [s for _ in procs for s in out.get(timeout=60)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len({s.visit for s in scans}) == 1
    dcids = [d for s in scans for d in s.dcids]
    assert len(set(dcids)) == 16
    for s in scans:
        assert db.parameters(s.dcids[0])["ispyb_dcg_dcids"] == [s.dcids[1]]


# ---- no credentials in output ----


def test_passwords_are_never_shown(db, caplog):
    shown = li.Ispyb("mysql+pymysql://xrc:pa55-s3cret@127.0.0.1:%d/ispyb" % free_port())
    assert "pa55-s3cret" not in repr(shown) and "***" in repr(shown)
    with caplog.at_level(logging.DEBUG), pytest.raises(li.IspybError) as e:
        shown.parameters(1)  # nothing listens there
    assert "pa55-s3cret" not in str(e.value) and "127.0.0.1" in str(e.value)
    assert "pa55-s3cret" not in caplog.text
    for url in ["mysql+pymysql://xrc:pa55-s3cret@127.0.0.1:port/ispyb", "postgresql://xrc:pa55-s3cret@host/ispyb"]:
        with pytest.raises(ValueError) as bad:
            li.Ispyb(url)
        assert "pa55-s3cret" not in str(bad.value)
    password = db.engine.url.password
    if password:  # MariaDB's: in no repr or error
        assert password not in repr(db) and password not in db.url
        with pytest.raises(li.UnknownDcidError) as e:
            db.parameters(987654321)
        assert password not in str(e.value)
