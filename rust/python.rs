//! The PyO3 bindings: the only module that knows about Python. It converts
//! arguments, releases the GIL around the core, and turns `InputError` into
//! `ValueError`. Everything it exposes is described in `_native.pyi`.

use std::collections::HashMap;
use std::fmt::Write;

use numpy::ndarray::Array;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArray3, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::exceptions::{PyIndexError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList, PySlice, PyTuple, PyType};

use crate::centre2d::{self, Snapshot};
use crate::centre3d::{self, Params, Xrc3d};
use crate::error::InputError;
use crate::grid::{Grid, Orientation, Scan};
use crate::pyrepr::write_float;
use crate::wells::{self, Wells};

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
    Ok(Grid::new(nx, ny, view.iter().copied().collect())?)
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

/// 2D centring; returns the result's fields in wire order (Python wraps them).
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
) -> PyResult<Bound<'py, PyDict>> {
    let scan = Scan::new(steps_x, steps_y, snaked, Orientation::parse(orientation)?)?;
    let (dx_mm, dy_mm, microns_per_pixel_x, microns_per_pixel_y, offset_x_px, offset_y_px) =
        snapshot;
    let snapshot = Snapshot {
        dx_mm,
        dy_mm,
        microns_per_pixel_x,
        microns_per_pixel_y,
        offset_x_px,
        offset_y_px,
    };
    let wells = Wells {
        limits: well_limits,
        sample_ids: multipin_sample_ids,
    };
    let counts = counts.as_slice()?.to_vec();
    let r = py.detach(|| centre2d::centre_2d(&counts, &scan, &snapshot, sample_id, &wells))?;
    let d = PyDict::new(py);
    let f = r.found.as_ref();
    d.set_item("centre_of_mass", f.map(|f| f.centre_of_mass.to_vec()))?;
    d.set_item("max_voxel", f.map(|f| f.max_voxel.to_vec()))?;
    d.set_item("max_count", f.map(|f| f.max_count as f64))?;
    d.set_item("n_voxels", f.map(|f| f.n_voxels))?;
    d.set_item("total_count", f.map(|f| f.total_count as f64))?;
    d.set_item("sample_id", f.and_then(|f| f.sample_id))?;
    d.set_item("steps", r.steps.to_vec())?;
    d.set_item("box_size_px", r.box_size_px.to_vec())?;
    d.set_item("snapshot_offset", r.snapshot_offset.to_vec())?;
    d.set_item("centre_x", f.map(|f| f.centre_x))?;
    d.set_item("centre_y", f.map(|f| f.centre_y))?;
    d.set_item("centre_x_box", f.map(|f| f.centre_of_mass[0]))?;
    d.set_item("centre_y_box", f.map(|f| f.centre_of_mass[1]))?;
    d.set_item("status", if f.is_some() { "ok" } else { "fail" })?;
    d.set_item(
        "message",
        if f.is_some() {
            "ok"
        } else {
            "No good images found"
        },
    )?;
    d.set_item("best_image", f.map(|f| f.best_image))?;
    d.set_item("reflections_in_best_image", f.map(|f| f.max_count))?;
    d.set_item(
        "best_region",
        f.map(|f| f.best_region.iter().map(|c| c.to_vec()).collect::<Vec<_>>()),
    )?;
    Ok(d)
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
    };
    let rows = py.detach(|| centre3d::centre_3d(&xy, &xz, &params))?;
    Ok(XrcResults { rows })
}

static XRC_RESULT: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// The Python class `zocalo_xrc.XrcResult`.
fn xrc_result_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    XRC_RESULT.import(py, "zocalo_xrc._results", "XrcResult")
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
        let mut rows = Vec::new();
        if let Some(results) = results {
            for (i, item) in results.try_iter()?.enumerate() {
                let item = item?;
                rows.push(from_result(&item).map_err(|e| {
                    PyTypeError::new_err(format!("results[{i}]: expected an XrcResult ({e})"))
                })?);
            }
        }
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
        let mut rows = self.rows.clone();
        if descending {
            rows.sort_by(|a, b| key(b).total_cmp(&key(a)));
        } else {
            rows.sort_by(|a, b| key(a).total_cmp(&key(b)));
        }
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
        write_results_json(&mut s, &self.rows);
        s
    }
}

/// JSON of a list of 3D results, in Python's `json.dumps` default spelling.
fn write_results_json(s: &mut String, rows: &[Xrc3d]) {
    fn ints(s: &mut String, v: &[i64]) {
        s.push('[');
        for (i, x) in v.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            write!(s, "{x}").unwrap();
        }
        s.push(']');
    }
    s.push('[');
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str("{\"centre_of_mass\": [");
        for (k, c) in r.centre_of_mass.iter().enumerate() {
            if k > 0 {
                s.push_str(", ");
            }
            write_float(s, *c);
        }
        s.push_str("], \"max_voxel\": ");
        ints(s, &r.max_voxel);
        s.push_str(", \"max_count\": ");
        write_float(s, r.max_count);
        write!(s, ", \"n_voxels\": {}, \"total_count\": ", r.n_voxels).unwrap();
        write_float(s, r.total_count);
        match r.sample_id {
            Some(id) => write!(s, ", \"sample_id\": {id}").unwrap(),
            None => s.push_str(", \"sample_id\": null"),
        }
        s.push_str(", \"bounding_box\": [");
        ints(s, &r.bounding_box[0]);
        s.push_str(", ");
        ints(s, &r.bounding_box[1]);
        s.push_str("]}");
    }
    s.push(']');
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(reshape_grid, m)?)?;
    m.add_function(wrap_pyfunction!(well_limits, m)?)?;
    m.add_function(wrap_pyfunction!(centre_2d, m)?)?;
    m.add_function(wrap_pyfunction!(centre_3d, m)?)?;
    m.add_class::<XrcResults>()?;
    Ok(())
}
