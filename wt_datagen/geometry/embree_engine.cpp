// Every candidate (ray, face) of a triangle scene in one Embree 3 traversal per ray.
//
// Embree's robust (watertight) triangle test proposes; an intersection filter records the face of every hit
// and rejects it, so the traversal goes on to the end of the ray and nothing is dropped: no tie rule, no
// same-distance filter, no re-casting. Every decision (is the face crossed, where, in which order) is left to
// the exact float64 kernel in kernels.py. Rays are processed in blocks by a few threads; the candidates go
// to a caller-owned buffer of fixed capacity, so memory does not grow with the depth of the scene: the call
// stops at the first block that does not fit and reports how many rays it finished.

#include <embree3/rtcore.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t BLOCK = 64;  // rays per unit of work handed to a thread

struct Collect {
  RTCIntersectContext ctx;  // first member: Embree passes &ctx to the filter
  std::vector<int32_t>* faces;
};

void record_and_reject(const RTCFilterFunctionNArguments* args) {
  auto* c = reinterpret_cast<Collect*>(args->context);
  for (unsigned i = 0; i < args->N; ++i) {
    if (args->valid[i] == 0) continue;
    c->faces->push_back(static_cast<int32_t>(RTCHitN_primID(args->hit, args->N, i)));
    args->valid[i] = 0;  // rejected: tfar stays infinite, so traversal continues past this hit
  }
}

void on_error(void* user, RTCError code, const char* message) {
  auto* last = static_cast<std::string*>(user);
  *last = "embree error " + std::to_string(static_cast<int>(code)) + ": " + (message ? message : "");
}

class Scene {
 public:
  Scene(py::array_t<float, py::array::c_style | py::array::forcecast> verts,
        py::array_t<uint32_t, py::array::c_style | py::array::forcecast> faces, int build_threads) {
    if (verts.ndim() != 2 || verts.shape(1) != 3) throw std::invalid_argument("verts: expected shape (V, 3)");
    if (faces.ndim() != 2 || faces.shape(1) != 3) throw std::invalid_argument("faces: expected shape (F, 3)");
    const int64_t V = verts.shape(0), F = faces.shape(0);
    if (F >= (int64_t(1) << 31)) throw std::invalid_argument("faces: more than 2^31 - 1");
    const uint32_t* f = faces.data();
    for (int64_t i = 0; i < 3 * F; ++i)
      if (f[i] >= V) throw std::invalid_argument("faces: vertex index out of range");
    std::string config = "verbose=0,set_affinity=0";
    if (build_threads > 0) config += ",threads=" + std::to_string(build_threads);
    device_ = rtcNewDevice(config.c_str());
    if (!device_) throw std::runtime_error("embree: cannot create a device");
    rtcSetDeviceErrorFunction(device_, on_error, &error_);
    {
      py::gil_scoped_release release;
      scene_ = rtcNewScene(device_);
      rtcSetSceneFlags(scene_, RTC_SCENE_FLAG_ROBUST);  // watertight: no ray slips between two triangles
      rtcSetSceneBuildQuality(scene_, RTC_BUILD_QUALITY_HIGH);
      RTCGeometry geom = rtcNewGeometry(device_, RTC_GEOMETRY_TYPE_TRIANGLE);
      auto* vb = static_cast<float*>(
          rtcSetNewGeometryBuffer(geom, RTC_BUFFER_TYPE_VERTEX, 0, RTC_FORMAT_FLOAT3, 3 * sizeof(float), V));
      auto* ib = static_cast<uint32_t*>(
          rtcSetNewGeometryBuffer(geom, RTC_BUFFER_TYPE_INDEX, 0, RTC_FORMAT_UINT3, 3 * sizeof(uint32_t), F));
      if (vb && ib) {
        std::memcpy(vb, verts.data(), sizeof(float) * 3 * V);
        std::memcpy(ib, f, sizeof(uint32_t) * 3 * F);
        rtcSetGeometryIntersectFilterFunction(geom, record_and_reject);
        rtcCommitGeometry(geom);
        rtcAttachGeometry(scene_, geom);
        rtcCommitScene(scene_);
      }
      rtcReleaseGeometry(geom);
    }
    if (!error_.empty()) {
      release();
      throw std::runtime_error(error_);
    }
  }

  ~Scene() { release(); }
  Scene(const Scene&) = delete;
  Scene& operator=(const Scene&) = delete;

  // Candidates of rays [start, stop) of rays (R, 6) float32 (origin, direction), in blocks from start on.
  // Ray r's faces are out_faces[out_off[r - start] : out_off[r - start] + out_cnt[r - start]]. Returns
  // (end, need): rays [start, end) are done; end == start when not even one block fits, and then need is
  // the capacity that block needs.
  py::tuple candidates(py::array_t<float, py::array::c_style | py::array::forcecast> rays, int64_t start,
                       int64_t stop, py::array_t<int64_t, py::array::c_style> out_off,
                       py::array_t<int32_t, py::array::c_style> out_cnt,
                       py::array_t<int32_t, py::array::c_style> out_faces, int num_threads) {
    if (rays.ndim() != 2 || rays.shape(1) != 6) throw std::invalid_argument("rays: expected shape (R, 6)");
    if (start < 0 || stop < start || stop > rays.shape(0)) throw std::invalid_argument("rays: bad range");
    if (out_off.size() < stop - start || out_cnt.size() < stop - start)
      throw std::invalid_argument("out_off, out_cnt: shorter than the range of rays");
    const float* ray = rays.data();
    int64_t* off = out_off.mutable_data();
    int32_t* cnt = out_cnt.mutable_data();
    int32_t* buf = out_faces.mutable_data();
    const int64_t capacity = out_faces.size();
    int64_t n_blocks = (stop - start + BLOCK - 1) / BLOCK;
    std::atomic<int64_t> next_block{0}, cursor{0}, first_failed{n_blocks}, need{0};

    auto work = [&]() {
      std::vector<int32_t> faces;
      std::vector<int64_t> block_cnt(BLOCK);
      Collect collect;
      rtcInitIntersectContext(&collect.ctx);
      collect.faces = &faces;
      for (;;) {
        const int64_t b = next_block.fetch_add(1);
        if (b >= n_blocks || b > first_failed.load()) return;
        const int64_t r0 = start + b * BLOCK, r1 = std::min(stop, r0 + BLOCK);
        faces.clear();
        for (int64_t r = r0; r < r1; ++r) {
          const size_t before = faces.size();
          trace(ray + 6 * r, collect);
          block_cnt[r - r0] = static_cast<int64_t>(faces.size() - before);
        }
        const int64_t n = static_cast<int64_t>(faces.size());
        const int64_t at = cursor.fetch_add(n);
        if (at + n > capacity) {  // does not fit: stop here, the caller takes the rays before this block
          int64_t f = first_failed.load();
          while (b < f && !first_failed.compare_exchange_weak(f, b)) {
          }
          if (b == 0) need.store(n);
          return;
        }
        std::memcpy(buf + at, faces.data(), sizeof(int32_t) * n);
        int64_t o = at;
        for (int64_t r = r0; r < r1; ++r) {
          off[r - start] = o;
          cnt[r - start] = static_cast<int32_t>(block_cnt[r - r0]);
          o += block_cnt[r - r0];
        }
      }
    };

    {
      py::gil_scoped_release release;
      const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), n_blocks));
      std::vector<std::thread> pool;
      for (int i = 1; i < threads; ++i) pool.emplace_back(work);
      work();
      for (auto& t : pool) t.join();
      if (first_failed.load() == 0 && need.load() <= capacity) {
        // The first block lost the buffer to blocks after it: run it alone, so that progress is certain.
        n_blocks = 1;
        next_block = 0;
        cursor = 0;
        first_failed = 1;
        work();
      }
    }
    if (!error_.empty()) throw std::runtime_error(error_);
    const int64_t end = std::min(stop, start + first_failed.load() * BLOCK);
    return py::make_tuple(end, need.load());
  }

 private:
  // One ray, every hit recorded. The direction is first scaled by a power of two (exact; only the ray
  // parameter changes, and no decision is taken on it here) to have its largest component in [0.5, 1).
  //
  // A direction component below 1e-18 in magnitude (exactly zero, mostly: axis-aligned cameras, rays along
  // an axis) needs more: Embree's box test replaces it by +1e-18 whatever its sign, so a ray running exactly
  // in the plane of a box's upper face skips that box and the faces in it that the ray touches; and such a
  // ray often runs exactly through vertices, where the fused multiply-adds of Embree's edge tests can leave
  // residues that reject every face of a fan seen edge-on. Such a ray is traced again tilted by TILT (8
  // float32 ulps) to each side in each of those components: a tilted ray passes a vertex the ray runs
  // through at a distance where Embree's test is sound, and crosses the faces of a box lying on its side of
  // the plane. The tilt moves the ray by at most TILT times the depth, inside the exact kernel's near-border
  // margin (64 ulps), so every face a tilted ray proposes near such a point makes its neighbours candidates.
  void trace(const float* q, Collect& collect) const {
    constexpr float TINY = 0x1p-58f;  // just above Embree's cut of 1e-18
    constexpr float TILT = 0x1p-21f;
    float d[3] = {q[3], q[4], q[5]};
    const float m = std::max({std::fabs(d[0]), std::fabs(d[1]), std::fabs(d[2])});
    int e = 0;
    std::frexp(m, &e);
    int tiny[3], n_tiny = 0;
    for (int c = 0; c < 3; ++c) {
      d[c] = std::ldexp(d[c], -e);
      if (std::fabs(d[c]) < TINY) tiny[n_tiny++] = c;
    }
    cast1(q, d, collect);
    if (n_tiny == 0) return;
    const float tilt = TILT * std::ldexp(m, -e);
    for (int signs = 0; signs < (1 << n_tiny); ++signs) {
      for (int k = 0; k < n_tiny; ++k) d[tiny[k]] = (signs >> k) & 1 ? -tilt : tilt;
      cast1(q, d, collect);
    }
  }

  void cast1(const float* q, const float* d, Collect& collect) const {
    RTCRayHit rh;
    rh.ray.org_x = q[0];
    rh.ray.org_y = q[1];
    rh.ray.org_z = q[2];
    rh.ray.dir_x = d[0];
    rh.ray.dir_y = d[1];
    rh.ray.dir_z = d[2];
    rh.ray.tnear = 0.0f;
    rh.ray.tfar = std::numeric_limits<float>::infinity();
    rh.ray.time = 0.0f;
    rh.ray.mask = 0xFFFFFFFFu;
    rh.ray.id = 0;
    rh.ray.flags = 0;
    rh.hit.geomID = RTC_INVALID_GEOMETRY_ID;
    rh.hit.primID = RTC_INVALID_GEOMETRY_ID;
    rtcIntersect1(scene_, &collect.ctx, &rh);
  }

  void release() {
    if (scene_) rtcReleaseScene(scene_);
    if (device_) rtcReleaseDevice(device_);
    scene_ = nullptr;
    device_ = nullptr;
  }

  RTCDevice device_ = nullptr;
  RTCScene scene_ = nullptr;
  std::string error_;
};

}  // namespace

PYBIND11_MODULE(embree_engine, m) {
  m.doc() = "Every candidate (ray, face) of a triangle scene in one Embree 3 traversal per ray.";
  py::class_<Scene>(m, "Scene")
      .def(py::init<py::array_t<float, py::array::c_style | py::array::forcecast>,
                    py::array_t<uint32_t, py::array::c_style | py::array::forcecast>, int>(),
           py::arg("verts"), py::arg("faces"), py::arg("build_threads") = 0,
           "verts (V, 3) float32, faces (F, 3) uint32; build_threads 0 for Embree's default.")
      .def("candidates", &Scene::candidates, py::arg("rays"), py::arg("start"), py::arg("stop"),
           py::arg("out_off"), py::arg("out_cnt"), py::arg("out_faces"), py::arg("num_threads") = 1);
  m.attr("EMBREE_VERSION") = RTC_VERSION_STRING;
}
