//! The PyO3 bindings: the only module that knows about Python. It converts
//! arguments, releases the GIL around the core, and turns `InputError` into
//! `ValueError`. Everything it exposes is described in `_native.pyi`.

use std::collections::HashMap;
use std::fmt::Write;

use numpy::ndarray::Array;
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArray3, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyIndexError, PyKeyboardInterrupt, PyMemoryError, PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PySlice, PyString, PyTuple, PyType};

use crate::centre2d::{self, Snapshot};
use crate::centre3d::{self, Halt, Params, Xrc3d};
use crate::error::InputError;
use crate::finder::{self, Finder};
use crate::spots::{SpotFilter, Spots};
use crate::strong::{Algorithm, Frame, Pixel, Rule};
use crate::grid::{Grid, Orientation, Scan};
use crate::json;
use crate::pia;
use crate::wells::{self, Wells};
use crate::wire::{self, Addressee, Results, Wire2d};

create_exception!(
    zocalo_xrc,
    ResultPayloadError,
    PyValueError,
    "A results message that is not what the wire format says; the message and `path` name where."
);

impl From<json::Error> for PyErr {
    fn from(e: json::Error) -> PyErr {
        let err = ResultPayloadError::new_err(e.to_string());
        Python::attach(|py| {
            let _ = err.value(py).setattr("path", e.path());
        });
        err
    }
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

impl From<InputError> for PyErr {
    fn from(e: InputError) -> PyErr {
        PyValueError::new_err(e.0)
    }
}

fn grid_from(name: &str, a: &PyReadonlyArray2<i64>) -> PyResult<Grid<i64>> {
    let view = a.as_array();
    let (nx, ny) = view.dim();
    if nx == 0 || ny == 0 {
        return Err(PyValueError::new_err(format!(
            "{name}: empty grid of shape ({nx}, {ny})"
        )));
    }
    // a C-contiguous array (what counts_array hands over) is one memcpy, not a walk
    let data = match a.as_slice() {
        Ok(values) => values.to_vec(),
        Err(_) => view.iter().copied().collect(),
    };
    Ok(Grid::new(nx, ny, data)?)
}

/// Counts in acquisition order laid out as `A[x][y]`, shape `(steps_x, steps_y)`.
#[pyfunction]
fn reshape_grid<'py>(
    py: Python<'py>,
    counts: PyReadonlyArray1<'py, i64>,
    steps_x: usize,
    steps_y: usize,
    snaked: bool,
    orientation: &str,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let scan = Scan::new(steps_x, steps_y, snaked, Orientation::parse(orientation)?)?;
    let grid = scan.reshape(counts.as_slice()?)?;
    let array =
        Array::from_shape_vec((grid.nx, grid.ny), grid.data).expect("shape checked by reshape");
    Ok(array.into_pyarray(py))
}

/// Well limits of a multi-sample pin, in grid boxes.
#[pyfunction]
fn well_limits(loop_type: &str, dx_mm: f64) -> Vec<(f64, f64)> {
    wells::well_limits(loop_type, dx_mm)
}

/// 2D centring; returns a `GridScan2DResult`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn centre_2d<'py>(
    py: Python<'py>,
    counts: PyReadonlyArray1<'py, i64>,
    steps_x: usize,
    steps_y: usize,
    snaked: bool,
    orientation: &str,
    snapshot: (f64, f64, f64, f64, f64, f64),
    sample_id: Option<i64>,
    multipin_sample_ids: HashMap<i64, i64>,
    well_limits: Vec<(f64, f64)>,
) -> PyResult<Bound<'py, PyAny>> {
    let scan = Scan::new(steps_x, steps_y, snaked, Orientation::parse(orientation)?)?;
    let (dx_mm, dy_mm, microns_per_pixel_x, microns_per_pixel_y, offset_x_px, offset_y_px) = snapshot;
    let snapshot = Snapshot { dx_mm, dy_mm, microns_per_pixel_x, microns_per_pixel_y, offset_x_px, offset_y_px };
    let wells = Wells { limits: well_limits, sample_ids: multipin_sample_ids };
    let counts = counts.as_slice()?.to_vec();
    let r = py.detach(|| centre2d::centre_2d(&counts, &scan, &snapshot, sample_id, &wells))?;
    to_result_2d(py, &Wire2d::from(&r))
}

/// 3D centring of `xy` `(nx, ny)` and `xz` `(nx, nz)`, both `A[x][...]`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn centre_3d<'py>(
    py: Python<'py>,
    xy: PyReadonlyArray2<'py, i64>,
    xz: PyReadonlyArray2<'py, i64>,
    threshold: f64,
    threshold_absolute: f64,
    sample_id: Option<i64>,
    multipin_sample_ids: HashMap<i64, i64>,
    well_limits: Vec<(f64, f64)>,
    max_runs: usize,
) -> PyResult<XrcResults> {
    let (xy, xz) = (grid_from("xy", &xy)?, grid_from("xz", &xz)?);
    let params = Params {
        threshold,
        threshold_absolute,
        sample_id,
        wells: Wells {
            limits: well_limits,
            sample_ids: multipin_sample_ids,
        },
        max_runs,
    };
    // Every few ms of scanning, take the GIL for a moment to see whether a
    // signal (Ctrl-C) came; its handler's exception is what the caller gets.
    let mut signal: Option<PyErr> = None;
    let outcome = py.detach(|| {
        let mut keep_going = || match Python::attach(|py| py.check_signals()) {
            Ok(()) => true,
            Err(e) => {
                signal = Some(e);
                false
            }
        };
        centre3d::centre_3d_with(&xy, &xz, &params, &mut keep_going)
    });
    match outcome {
        Ok(rows) => Ok(XrcResults { rows }),
        Err(Halt::Input(e)) => Err(e.into()),
        Err(Halt::Interrupted) => Err(signal.unwrap_or_else(|| PyKeyboardInterrupt::new_err("interrupted"))),
        Err(Halt::OutOfMemory(m)) => Err(PyMemoryError::new_err(m)),
    }
}

static XRC_RESULT: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static GRID_SCAN_2D_RESULT: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// The Python class `zocalo_xrc.XrcResult`.
fn xrc_result_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    XRC_RESULT.import(py, "zocalo_xrc._results", "XrcResult")
}

/// The Python class `zocalo_xrc.GridScan2DResult`.
fn result_2d_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    GRID_SCAN_2D_RESULT.import(py, "zocalo_xrc._results", "GridScan2DResult")
}

fn to_result_2d<'py>(py: Python<'py>, r: &Wire2d) -> PyResult<Bound<'py, PyAny>> {
    let pair = |v: Option<[f64; 2]>| v.map(|v| (v[0], v[1]));
    let region = match &r.best_region {
        None => None,
        Some(cells) => Some(PyTuple::new(py, cells.iter().map(|c| (c[0], c[1])))?),
    };
    let args = PyTuple::new(
        py,
        [
            pair(r.centre_of_mass).into_pyobject(py)?.into_any(),
            r.max_voxel.map(|v| (v[0], v[1])).into_pyobject(py)?.into_any(),
            r.max_count.into_pyobject(py)?.into_any(),
            r.n_voxels.into_pyobject(py)?.into_any(),
            r.total_count.into_pyobject(py)?.into_any(),
            r.sample_id.into_pyobject(py)?.into_any(),
            (r.steps[0], r.steps[1]).into_pyobject(py)?.into_any(),
            (r.box_size_px[0], r.box_size_px[1]).into_pyobject(py)?.into_any(),
            (r.snapshot_offset[0], r.snapshot_offset[1]).into_pyobject(py)?.into_any(),
            r.centre_x.into_pyobject(py)?.into_any(),
            r.centre_y.into_pyobject(py)?.into_any(),
            r.centre_x_box.into_pyobject(py)?.into_any(),
            r.centre_y_box.into_pyobject(py)?.into_any(),
            r.status.as_str().into_pyobject(py)?.into_any(),
            r.message.as_str().into_pyobject(py)?.into_any(),
            r.best_image.into_pyobject(py)?.into_any(),
            r.reflections_in_best_image.into_pyobject(py)?.into_any(),
            region.into_pyobject(py)?.into_any(),
        ],
    )?;
    result_2d_type(py)?.call1(args)
}

fn from_result_2d(obj: &Bound<'_, PyAny>) -> PyResult<Wire2d> {
    let get = |name: &str| obj.getattr(name);
    let pair = |name: &str| -> PyResult<Option<[f64; 2]>> {
        Ok(get(name)?.extract::<Option<(f64, f64)>>()?.map(|(a, b)| [a, b]))
    };
    let ints = |name: &str| -> PyResult<Option<[i64; 2]>> {
        Ok(get(name)?.extract::<Option<(i64, i64)>>()?.map(|(a, b)| [a, b]))
    };
    let region: Option<Vec<(i64, i64)>> = get("best_region")?.extract()?;
    Ok(Wire2d {
        centre_of_mass: pair("centre_of_mass")?,
        max_voxel: ints("max_voxel")?,
        max_count: get("max_count")?.extract()?,
        n_voxels: get("n_voxels")?.extract()?,
        total_count: get("total_count")?.extract()?,
        sample_id: get("sample_id")?.extract()?,
        steps: ints("steps")?.ok_or_else(|| PyTypeError::new_err("steps must not be None"))?,
        box_size_px: pair("box_size_px")?.ok_or_else(|| PyTypeError::new_err("box_size_px must not be None"))?,
        snapshot_offset: pair("snapshot_offset")?
            .ok_or_else(|| PyTypeError::new_err("snapshot_offset must not be None"))?,
        centre_x: get("centre_x")?.extract()?,
        centre_y: get("centre_y")?.extract()?,
        centre_x_box: get("centre_x_box")?.extract()?,
        centre_y_box: get("centre_y_box")?.extract()?,
        status: get("status")?.extract()?,
        message: get("message")?.extract()?,
        best_image: get("best_image")?.extract()?,
        reflections_in_best_image: get("reflections_in_best_image")?.extract()?,
        best_region: region.map(|r| r.into_iter().map(|(y, x)| [y, x]).collect()),
    })
}

fn to_result<'py>(py: Python<'py>, r: &Xrc3d) -> PyResult<Bound<'py, PyAny>> {
    let [lo, hi] = r.bounding_box;
    let args = (
        PyTuple::new(py, r.centre_of_mass)?,
        PyTuple::new(py, r.max_voxel)?,
        r.max_count,
        r.n_voxels,
        r.total_count,
        r.sample_id,
        (PyTuple::new(py, lo)?, PyTuple::new(py, hi)?),
    );
    xrc_result_type(py)?.call1(args)
}

fn from_result(obj: &Bound<'_, PyAny>) -> PyResult<Xrc3d> {
    let get = |name: &str| obj.getattr(name);
    let bbox: ([i64; 3], [i64; 3]) = get("bounding_box")?.extract()?;
    Ok(Xrc3d {
        centre_of_mass: get("centre_of_mass")?.extract()?,
        max_voxel: get("max_voxel")?.extract()?,
        max_count: get("max_count")?.extract()?,
        n_voxels: get("n_voxels")?.extract()?,
        total_count: get("total_count")?.extract()?,
        sample_id: get("sample_id")?.extract()?,
        bounding_box: [bbox.0, bbox.1],
    })
}

/// Rows from an iterable of `XrcResult`s; a bad one is named `results[i]`.
fn rows_from<'py>(items: impl IntoIterator<Item = PyResult<Bound<'py, PyAny>>>) -> PyResult<Vec<Xrc3d>> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let item = item?;
            from_result(&item)
                .map_err(|e| PyTypeError::new_err(format!("results[{i}]: expected an XrcResult ({e})")))
        })
        .collect()
}

/// The key a results set can be sorted by.
fn sort_key(by: &str) -> PyResult<fn(&Xrc3d) -> f64> {
    Ok(match by {
        "max_count" => |r| r.max_count,
        "total_count" => |r| r.total_count,
        "n_voxels" => |r| r.n_voxels as f64,
        other => {
            return Err(PyValueError::new_err(format!(
                "sorted(by={other:?}): expected one of \"max_count\", \"total_count\", \"n_voxels\""
            )))
        }
    })
}

/// 3D X-ray centring results: a sequence of `XrcResult` held as columns.
#[pyclass(module = "zocalo_xrc", frozen, sequence)]
pub struct XrcResults {
    rows: Vec<Xrc3d>,
}

impl XrcResults {
    fn column<'py, const N: usize, T: numpy::Element + Copy>(
        &self,
        py: Python<'py>,
        f: impl Fn(&Xrc3d) -> [T; N],
    ) -> Bound<'py, PyArray2<T>> {
        let flat: Vec<T> = self.rows.iter().flat_map(&f).collect();
        Array::from_shape_vec((self.rows.len(), N), flat)
            .expect("N values per row")
            .into_pyarray(py)
    }

    fn scalar<'py, T: numpy::Element>(
        &self,
        py: Python<'py>,
        f: impl Fn(&Xrc3d) -> T,
    ) -> Bound<'py, PyArray1<T>> {
        PyArray1::from_iter(py, self.rows.iter().map(f))
    }
}

#[pymethods]
impl XrcResults {
    #[new]
    #[pyo3(signature = (results = None))]
    fn new(results: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let rows = match results {
            Some(results) => rows_from(results.try_iter()?)?,
            None => Vec::new(),
        };
        Ok(XrcResults { rows })
    }

    fn __len__(&self) -> usize {
        self.rows.len()
    }

    fn __getitem__<'py>(
        &self,
        py: Python<'py>,
        index: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if let Ok(slice) = index.cast::<PySlice>() {
            let ix = slice.indices(self.rows.len() as isize)?;
            let rows = (0..ix.slicelength)
                .map(|k| self.rows[(ix.start + k as isize * ix.step) as usize].clone())
                .collect();
            return Ok(Bound::new(py, XrcResults { rows })?.into_any());
        }
        let i: isize = index.extract()?;
        let n = self.rows.len() as isize;
        let j = if i < 0 { i + n } else { i };
        if !(0..n).contains(&j) {
            return Err(PyIndexError::new_err(format!(
                "XrcResults index {i} out of range for {n} results"
            )));
        }
        to_result(py, &self.rows[j as usize])
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let items = self
            .rows
            .iter()
            .map(|r| to_result(py, r))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)?.try_iter().map(|it| it.into_any())
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> PyResult<bool> {
        match other.cast::<XrcResults>() {
            Ok(o) => Ok(self.rows == o.get().rows),
            Err(_) => Ok(false),
        }
    }

    fn __repr__(&self) -> String {
        let mut s = format!(
            "XrcResults({} result{}",
            self.rows.len(),
            if self.rows.len() == 1 { "" } else { "s" }
        );
        if let Some(best) = self.rows.first() {
            let c = best.centre_of_mass;
            write!(
                s,
                "; first: centre_of_mass=({:.3}, {:.3}, {:.3}), max_count={}",
                c[0], c[1], c[2], best.max_count
            )
            .unwrap();
        }
        s.push(')');
        s
    }

    /// `(N, 3)` float64.
    #[getter]
    fn centre_of_mass<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f64>> {
        self.column(py, |r| r.centre_of_mass)
    }

    /// `(N, 3)` int64.
    #[getter]
    fn max_voxel<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<i64>> {
        self.column(py, |r| r.max_voxel)
    }

    /// `(N, 2, 3)` int64, half-open.
    #[getter]
    fn bounding_box<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray3<i64>> {
        let flat: Vec<i64> = self
            .rows
            .iter()
            .flat_map(|r| r.bounding_box.concat())
            .collect();
        Array::from_shape_vec((self.rows.len(), 2, 3), flat)
            .expect("6 values per row")
            .into_pyarray(py)
    }

    #[getter]
    fn max_count<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.scalar(py, |r| r.max_count)
    }

    #[getter]
    fn total_count<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.scalar(py, |r| r.total_count)
    }

    #[getter]
    fn n_voxels<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        self.scalar(py, |r| r.n_voxels)
    }

    /// int64 masked array: masked where a result has no sample id.
    #[getter]
    fn sample_id<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let data = self.scalar(py, |r| r.sample_id.unwrap_or(0));
        let mask = self.scalar(py, |r| r.sample_id.is_none());
        py.import("numpy.ma")?
            .call_method1("masked_array", (data, mask))
    }

    /// A new `XrcResults`, stably sorted by `by`, largest first unless `descending=False`.
    #[pyo3(signature = (by = "max_count", descending = true))]
    fn sorted(&self, by: &str, descending: bool) -> PyResult<XrcResults> {
        let key = sort_key(by)?;
        // Sort (key, index) pairs, stably, rather than moving whole rows.
        let mut order: Vec<(f64, u32)> = self.rows.iter().enumerate().map(|(i, r)| (key(r), i as u32)).collect();
        if descending {
            order.sort_by(|a, b| b.0.total_cmp(&a.0));
        } else {
            order.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        let rows = order.iter().map(|&(_, i)| self.rows[i as usize].clone()).collect();
        Ok(XrcResults { rows })
    }

    /// The results as dicts of the wire format's shape and key order.
    fn to_dicts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let dicts = self
            .rows
            .iter()
            .map(|r| {
                let d = PyDict::new(py);
                let [lo, hi] = r.bounding_box;
                d.set_item("centre_of_mass", r.centre_of_mass.to_vec())?;
                d.set_item("max_voxel", r.max_voxel.to_vec())?;
                d.set_item("max_count", r.max_count)?;
                d.set_item("n_voxels", r.n_voxels)?;
                d.set_item("total_count", r.total_count)?;
                d.set_item("sample_id", r.sample_id)?;
                d.set_item("bounding_box", vec![lo.to_vec(), hi.to_vec()])?;
                Ok(d)
            })
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, dicts)
    }

    /// The results as a JSON list, byte for byte what `json.dumps(self.to_dicts())` writes.
    fn to_json(&self) -> String {
        let mut s = String::with_capacity(self.rows.len() * 200 + 2);
        wire::write_results_3d(&mut s, &self.rows);
        s
    }

    /// The results with at least the given counts (order kept), e.g.
    /// `at_least(total_count=3)`, the cut consumers usually make.
    #[pyo3(signature = (*, max_count = None, total_count = None, n_voxels = None))]
    fn at_least(&self, max_count: Option<f64>, total_count: Option<f64>, n_voxels: Option<i64>) -> XrcResults {
        let rows = self
            .rows
            .iter()
            .filter(|r| {
                max_count.is_none_or(|m| r.max_count >= m)
                    && total_count.is_none_or(|t| r.total_count >= t)
                    && n_voxels.is_none_or(|n| r.n_voxels >= n)
            })
            .cloned()
            .collect();
        XrcResults { rows }
    }
}

/// Bodies above this size are parsed with the GIL released.
const DETACH_ABOVE: usize = 64 * 1024;

/// A decoded results message (see `zocalo_xrc.parse_result_message`).
#[pyclass(module = "zocalo_xrc", frozen)]
pub struct ResultMessage {
    /// `XrcResults` for a 3D payload, a 1-tuple of `GridScan2DResult` for 2D.
    #[pyo3(get)]
    results: Py<PyAny>,
    kind: &'static str,
    #[pyo3(get)]
    status: Option<String>,
    #[pyo3(get)]
    dcid: Option<i64>,
    #[pyo3(get)]
    dcgid: Option<i64>,
    #[pyo3(get)]
    gpu: bool,
    #[pyo3(get)]
    environment_id: Option<String>,
    no_crystal: bool,
}

#[pymethods]
impl ResultMessage {
    /// `"3d"` or `"2d"`.
    #[getter(r#type)]
    fn kind(&self) -> &'static str {
        self.kind
    }

    /// True when Zocalo answered that there is no crystal: no 3D results, or a
    /// failed 2D result. (No answer at all is a different thing: a timeout.)
    #[getter]
    fn no_crystal(&self) -> bool {
        self.no_crystal
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let status = self.status.clone().into_pyobject(py)?.repr()?;
        let dcid = self.dcid.into_pyobject(py)?.repr()?;
        let dcgid = self.dcgid.into_pyobject(py)?.repr()?;
        let gpu = if self.gpu { "True" } else { "False" };
        let results = self.results.bind(py).repr()?;
        Ok(format!(
            "ResultMessage(type='{}', status={status}, dcid={dcid}, dcgid={dcgid}, gpu={gpu}, results={results})",
            self.kind
        ))
    }
}

/// Decode a results message body: bytes, bytearray, memoryview or str.
#[pyfunction]
fn parse_result_message(py: Python<'_>, body: &Bound<'_, PyAny>) -> PyResult<ResultMessage> {
    let parse = |bytes: &[u8]| {
        if bytes.len() > DETACH_ABOVE {
            py.detach(|| wire::parse_result_message(bytes))
        } else {
            wire::parse_result_message(bytes)
        }
    };
    let message = if let Ok(b) = body.cast::<PyBytes>() {
        parse(b.as_bytes())
    } else if let Ok(s) = body.cast::<PyString>() {
        match s.to_str() {
            Ok(text) => parse(text.as_bytes()),
            Err(_) => return Err(ResultPayloadError::new_err("the body is a str that is not valid Unicode (lone surrogates)")),
        }
    } else if let Ok(b) = body.cast::<PyByteArray>() {
        parse(&b.to_vec())
    } else if let Ok(buffer) = PyBuffer::<u8>::get(body) {
        parse(&buffer.to_vec(py)?)
    } else {
        return Err(PyTypeError::new_err(format!(
            "parse_result_message: expected bytes, bytearray, memoryview or str, got {}",
            body.get_type().name()?
        )));
    }?;
    let (results, kind, no_crystal) = match message.results {
        Results::ThreeD(rows) => {
            let empty = rows.is_empty();
            (Bound::new(py, XrcResults { rows })?.into_any(), "3d", empty)
        }
        Results::TwoD(rows) => {
            let failed = rows.iter().all(|r| r.status != "ok");
            let items = rows.iter().map(|r| to_result_2d(py, r)).collect::<PyResult<Vec<_>>>()?;
            (PyTuple::new(py, items)?.into_any(), "2d", failed)
        }
    };
    Ok(ResultMessage {
        results: results.unbind(),
        kind,
        status: message.status,
        dcid: message.dcid,
        dcgid: message.dcgid,
        gpu: message.gpu,
        environment_id: message.environment_id,
        no_crystal,
    })
}

/// The body of a results message for `results` (an `XrcResults`, a
/// `GridScan2DResult`, or a sequence of either kind), in the wire format.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn build_result_message<'py>(
    py: Python<'py>,
    results: &Bound<'py, PyAny>,
    dcid: i64,
    dcgid: Option<i64>,
    gpu: bool,
    beamline: String,
    environment_id: String,
    status: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let results = if let Ok(rs) = results.cast::<XrcResults>() {
        Results::ThreeD(rs.get().rows.clone())
    } else if results.is_instance(result_2d_type(py)?)? {
        Results::TwoD(vec![from_result_2d(results)?])
    } else {
        let items: Vec<Bound<'py, PyAny>> = results.try_iter()?.collect::<PyResult<_>>()?;
        let result_2d = result_2d_type(py)?;
        let mut all_2d = !items.is_empty();
        for item in &items {
            all_2d &= item.is_instance(result_2d)?;
        }
        if all_2d {
            Results::TwoD(items.iter().map(from_result_2d).collect::<PyResult<_>>()?)
        } else {
            Results::ThreeD(rows_from(items.into_iter().map(Ok))?)
        }
    };
    let to = Addressee { dcid, dcgid, gpu, beamline, environment_id };
    let mut body = String::new();
    wire::write_result_message(&mut body, &results, status, &to);
    Ok(PyBytes::new(py, body.as_bytes()))
}

/// The fields of a plain per-image message, or None: read it the slow way
/// (see `pia.rs`). `(dcid, group, experiment_type, (gridinfo start, end),
/// file_number, spots, seen_at)`.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn pia_fields<'py>(
    py: Python<'py>,
    body: &Bound<'py, PyBytes>,
) -> PyResult<Option<(u64, Bound<'py, PyTuple>, String, (usize, usize), u64, u64, Option<f64>)>> {
    let Some(f) = pia::pia_fields(body.as_bytes()) else { return Ok(None) };
    let group = PyTuple::new(py, f.group)?;
    Ok(Some((f.dcid, group, f.experiment_type, f.gridinfo, f.file_number, f.spots, f.seen_at)))
}

// ---- spot finding -------------------------------------------------------

/// Run `$body` with `$frame` bound to a `Frame` of the 2D array `$image`,
/// whichever pixel type it holds (a strided array is copied first).
macro_rules! with_frame {
    ($image:expr, |$frame:ident| $body:expr) => {{
        let image: &Bound<'_, PyAny> = $image;
        with_frame!(@try image, $frame, $body; u16, u32, i32, f32, f64, u8, i16)
    }};
    (@try $image:ident, $frame:ident, $body:expr; $t:ty $(, $rest:ty)*) => {
        if let Ok(a) = $image.cast::<PyArray2<$t>>() {
            let ro = a.readonly();
            let view = ro.as_array();
            let standard = view.as_standard_layout();
            let (h, w) = standard.dim();
            let data = standard.as_slice().expect("a standard-layout array is one slice");
            let $frame = Frame::new(data, h, w)?;
            ($body).map_err(PyErr::from)
        } else {
            with_frame!(@try $image, $frame, $body; $($rest),*)
        }
    };
    (@try $image:ident, $frame:ident, $body:expr;) => {
        Err(not_an_image($image))
    };
}

fn not_an_image(image: &Bound<'_, PyAny>) -> PyErr {
    match image.cast::<numpy::PyUntypedArray>() {
        Ok(a) if a.ndim() != 2 => PyValueError::new_err(format!(
            "an image is a 2D array, not {}D (shape {:?})",
            a.ndim(),
            a.shape()
        )),
        Ok(a) => PyTypeError::new_err(format!(
            "an image of {} pixels: uint8, uint16, uint32, int16, int32, float32 or float64 (native byte order) are read",
            a.dtype()
        )),
        Err(_) => PyTypeError::new_err(format!(
            "an image is a 2D numpy array, not {}",
            image.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        )),
    }
}

/// The spots of one frame: columns, one entry per spot.
#[pyclass(module = "zocalo_xrc", frozen, name = "Spots")]
pub struct PySpots {
    spots: Spots,
}

#[pymethods]
impl PySpots {
    /// Strong pixels in the frame, in spots of any size.
    #[getter]
    fn n_strong_pixels(&self) -> usize {
        self.spots.n_strong_pixels
    }
    fn __len__(&self) -> usize {
        self.spots.len()
    }
    /// `(n, 2)`: value-weighted `(x, y)` in pixels, a pixel's centre at +0.5.
    #[getter]
    fn centroid<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f64>> {
        let flat: Vec<f64> = self.spots.centroid.iter().flatten().copied().collect();
        Array::from_shape_vec((self.spots.len(), 2), flat).expect("2 per spot").into_pyarray(py)
    }
    /// `(n,)`: pixels in each spot.
    #[getter]
    fn size<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        PyArray1::from_iter(py, self.spots.size.iter().map(|&s| s as i64))
    }
    /// `(n,)`: the sum of each spot's pixel values.
    #[getter]
    fn intensity<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, &self.spots.intensity)
    }
    /// `(n, 4)`: `x0, x1, y0, y1`, half-open, as DIALS orders a bounding box.
    #[getter]
    fn bounding_box<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<i64>> {
        let flat: Vec<i64> = self.spots.bounding_box.iter().flatten().map(|&v| v as i64).collect();
        Array::from_shape_vec((self.spots.len(), 4), flat).expect("4 per spot").into_pyarray(py)
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other.cast::<PySpots>().is_ok_and(|o| o.get().spots == self.spots)
    }
    fn __repr__(&self) -> String {
        format!("Spots({} spots, {} strong pixels)", self.spots.len(), self.spots.n_strong_pixels)
    }
}

/// The Rust spot finder behind `zocalo_xrc.SpotFinder`.
#[pyclass(module = "zocalo_xrc._native", frozen, name = "Finder")]
pub struct PyFinder {
    finder: Finder,
}

/// A frame's error, with which frame it was (`index`) for the caller to name.
fn frame_error(py: Python<'_>, index: usize, e: InputError) -> PyErr {
    let err = PyValueError::new_err(e.0);
    let _ = err.value(py).setattr("index", index);
    err
}

/// `$body` with `$T` the pixel type named by `$dtype` (numpy's name), or
/// the TypeError naming a type no frame is read as.
macro_rules! by_pixel_type {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            "uint16" => { type $T = u16; $body }
            "uint32" => { type $T = u32; $body }
            "int32" => { type $T = i32; $body }
            "uint8" => { type $T = u8; $body }
            "int16" => { type $T = i16; $body }
            "float32" => { type $T = f32; $body }
            "float64" => { type $T = f64; $body }
            other => return Err(PyTypeError::new_err(format!("frames of {other} are not read"))),
        }
    };
}

fn spots_list<'py>(py: Python<'py>, results: Vec<Result<Spots, InputError>>) -> PyResult<Vec<Bound<'py, PySpots>>> {
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| match r {
            Ok(spots) => Bound::new(py, PySpots { spots }),
            Err(e) => Err(frame_error(py, i, e)),
        })
        .collect()
}

#[pymethods]
impl PyFinder {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (mask, trusted_max, algorithm, kernel_size, sigma_background, sigma_strong,
                        global_threshold, min_local, gain, min_spot_size, max_spot_size, max_separation))]
    fn new(
        mask: Option<PyReadonlyArray2<'_, bool>>,
        trusted_max: Option<f64>,
        algorithm: &str,
        kernel_size: (usize, usize),
        sigma_background: f64,
        sigma_strong: f64,
        global_threshold: f64,
        min_local: u32,
        gain: Option<f64>,
        min_spot_size: u32,
        max_spot_size: Option<u32>,
        max_separation: Option<f64>,
    ) -> PyResult<Self> {
        let rule = Rule {
            algorithm: Algorithm::parse(algorithm)?,
            kernel: kernel_size,
            sigma_background,
            sigma_strong,
            global_threshold,
            min_local,
            gain,
        };
        let mask = mask.map(|m| {
            let v = m.as_array();
            let (h, w) = v.dim();
            (v.iter().copied().collect::<Vec<bool>>(), h, w)
        });
        let limits = SpotFilter { min_size: min_spot_size, max_size: max_spot_size, max_separation };
        Ok(PyFinder { finder: Finder::new(rule, limits, mask, trusted_max)? })
    }

    fn find<'py>(&self, py: Python<'py>, image: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PySpots>> {
        let spots = with_frame!(image, |frame| py.detach(|| self.finder.find(&frame)))?;
        Bound::new(py, PySpots { spots })
    }

    /// A bool array of the image's shape: True where a pixel is strong.
    fn strong_pixels<'py>(&self, py: Python<'py>, image: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray2<bool>>> {
        let (strong, h, w) = with_frame!(image, |frame| {
            let (h, w) = (frame.height, frame.width);
            py.detach(|| self.finder.strong(&frame)).map(|s| (s, h, w))
        })?;
        let mut out = Array::from_elem((h, w), false);
        let flat = out.as_slice_mut().expect("a new array is one slice");
        for &at in &strong.index {
            flat[at as usize] = true;
        }
        Ok(out.into_pyarray(py))
    }

    /// The spots of 2D arrays of one pixel type, `threads` at a time (0: every core).
    fn find_many<'py>(
        &self,
        py: Python<'py>,
        images: Vec<Bound<'py, PyAny>>,
        threads: usize,
    ) -> PyResult<Vec<Bound<'py, PySpots>>> {
        let Some(first) = images.first() else { return Ok(Vec::new()) };
        macro_rules! many {
            ($t:ty) => {{
                let arrays = images
                    .iter()
                    .enumerate()
                    .map(|(i, a)| {
                        a.cast::<PyArray2<$t>>().map(|a| a.readonly()).map_err(|_| {
                            frame_error(py, i, InputError::new(format!(
                                "image {i} is not a 2D {} array like image 0", <$t as Pixel>::DTYPE)))
                        })
                    })
                    .collect::<PyResult<Vec<_>>>()?;
                let views: Vec<_> = arrays.iter().map(|a| a.as_array()).collect();
                let standard: Vec<_> = views.iter().map(|v| v.as_standard_layout()).collect();
                let frames = standard
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let (h, w) = s.dim();
                        Frame::new(s.as_slice().expect("one slice"), h, w).map_err(|e| frame_error(py, i, e))
                    })
                    .collect::<PyResult<Vec<Frame<$t>>>>()?;
                let results = py.detach(|| self.finder.find_many(&frames, threads));
                spots_list(py, results)
            }};
        }
        macro_rules! dispatch {
            ($($t:ty),*) => {
                $(if first.cast::<PyArray2<$t>>().is_ok() { return many!($t); })*
            };
        }
        dispatch!(u16, u32, i32, f32, f64, u8, i16);
        Err(not_an_image(first))
    }

    /// The spots of bitshuffle-LZ4 chunks (HDF5 filter 32008) of `shape`
    /// frames of `dtype`, decoded and searched `threads` at a time.
    fn find_chunks<'py>(
        &self,
        py: Python<'py>,
        chunks: Vec<Bound<'py, PyBytes>>,
        dtype: &str,
        shape: (usize, usize),
        threads: usize,
    ) -> PyResult<Vec<Bound<'py, PySpots>>> {
        let raw: Vec<&[u8]> = chunks.iter().map(|c| c.as_bytes()).collect();
        let (h, w) = shape;
        let results = by_pixel_type!(dtype, T => py.detach(|| self.finder.find_chunks::<T>(&raw, h, w, threads)));
        spots_list(py, results)
    }

    /// The spots of bitshuffle-LZ4 chunks of `shape` frames of `dtype` that
    /// lie in the file at `path`, at `extents` (each chunk's first byte and
    /// length): read, decoded and searched `threads` at a time, without the
    /// GIL (the reads too).
    fn find_chunks_at<'py>(
        &self,
        py: Python<'py>,
        path: std::path::PathBuf,
        extents: Vec<(u64, usize)>,
        dtype: &str,
        shape: (usize, usize),
        threads: usize,
    ) -> PyResult<Vec<Bound<'py, PySpots>>> {
        let file = py
            .detach(|| std::fs::File::open(&path))
            .map_err(|e| PyOSError::new_err(format!("{}: {e}", path.display())))?;
        let (h, w) = shape;
        let results = by_pixel_type!(dtype, T => py.detach(|| self.finder.find_chunks_at::<T>(&file, &extents, h, w, threads)));
        spots_list(py, results)
    }
}

/// A bitshuffle-LZ4 chunk (HDF5 filter 32008) decoded into an array of `shape`.
#[pyfunction]
fn decode_bslz4<'py>(
    py: Python<'py>,
    chunk: &Bound<'py, PyBytes>,
    dtype: &str,
    shape: Vec<usize>,
) -> PyResult<Bound<'py, PyAny>> {
    let raw = chunk.as_bytes();
    let n: usize = shape.iter().product();
    // not zeroed first: the decoder writes every value (a fresh zeroed
    // frame cost a fifth of the decoding)
    by_pixel_type!(dtype, T => {
        let frame = py.detach(|| finder::decode_new_frame::<T>(raw, n, &mut Vec::new()))?;
        Ok(Array::from_shape_vec(shape, frame).expect("n values").into_pyarray(py).into_any())
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(reshape_grid, m)?)?;
    m.add_function(wrap_pyfunction!(well_limits, m)?)?;
    m.add_function(wrap_pyfunction!(centre_2d, m)?)?;
    m.add_function(wrap_pyfunction!(centre_3d, m)?)?;
    m.add("MAX_RUNS", centre3d::MAX_RUNS)?;
    m.add_function(wrap_pyfunction!(parse_result_message, m)?)?;
    m.add_function(wrap_pyfunction!(build_result_message, m)?)?;
    m.add_function(wrap_pyfunction!(pia_fields, m)?)?;
    m.add_class::<XrcResults>()?;
    m.add_class::<ResultMessage>()?;
    m.add_class::<PySpots>()?;
    m.add_class::<PyFinder>()?;
    m.add_function(wrap_pyfunction!(decode_bslz4, m)?)?;
    m.add("ResultPayloadError", m.py().get_type::<ResultPayloadError>())?;
    Ok(())
}
