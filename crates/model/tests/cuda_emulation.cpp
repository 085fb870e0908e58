// Host emulation of the CUDA kernels in src/backend/cuda/kernels.cu, run by tests/cuda_kernels_emulated.rs:
// every block of a launch runs as blockDim.x std::threads sharing a barrier (for __syncthreads), so
// the kernels execute as written, block reductions included, and are compared with plain loops
// (im2col), the adjoint identity (col2im) and finite differences (the fused norm backward). Exit
// status 0 when all agree.
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>
#include <random>
struct dim3 { unsigned int x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
std::barrier<> *bar;
void __syncthreads() { bar->arrive_and_wait(); }
unsigned char shared_raw[1 << 16];
#define __device__
#define __global__
#define __shared__
using std::sqrt;
#include "../src/backend/cuda/kernels.cu"

void launch(unsigned grid, unsigned block, std::function<void()> f) {
  gridDim.x = grid; blockDim.x = block;
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> br(block); bar = &br;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < block; ++t) ts.emplace_back([&, b, t] { blockIdx.x = b; threadIdx.x = t; f(); });
    for (auto &t : ts) t.join();
  }
}
double maxdiff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0; for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i]-b[i])); return m;
}
int main() {
  std::mt19937 rng(1); std::normal_distribution<double> nd;
  int fails = 0;
  // im2col / col2im: N=2, C=3, H=5, W=4, k=3, pad=1 and pad=2
  for (unsigned pad : {0u, 1u, 2u}) {
    unsigned N=2,C=3,H=5,W=4,K=3, HO=H+2*pad-K+1, WO=W+2*pad-K+1, rows=N*HO*WO, cols=C*K*K;
    std::vector<double> x(N*C*H*W); for (auto& v: x) v = nd(rng);
    std::vector<double> got(rows*cols, -7), ref(rows*cols, 0);
    launch(3, 8, [&]{ im2col_f64(x.data(), got.data(), rows, C, H, W, HO, WO, K, pad); });
    for (unsigned n=0;n<N;++n) for (unsigned oy=0;oy<HO;++oy) for (unsigned ox=0;ox<WO;++ox)
      for (unsigned c=0;c<C;++c) for (unsigned ky=0;ky<K;++ky) for (unsigned kx=0;kx<K;++kx) {
        int iy=int(oy+ky)-int(pad), ix=int(ox+kx)-int(pad);
        ref[((n*HO+oy)*WO+ox)*cols + (c*K+ky)*K+kx] = (iy>=0&&iy<int(H)&&ix>=0&&ix<int(W)) ? x[((n*C+c)*H+iy)*W+ix] : 0;
      }
    double d = maxdiff(got, ref); printf("im2col pad %u: %g\n", pad, d); fails += d > 0;
    // col2im adjoint: <im2col(x), y> == <x, col2im(y)>
    std::vector<double> y(rows*cols); for (auto& v: y) v = nd(rng);
    std::vector<double> back(N*C*H*W, -7);
    launch(5, 16, [&]{ col2im_f64(y.data(), back.data(), N*C*H*W, C, H, W, HO, WO, K, pad); });
    double l=0, r=0; for (size_t i=0;i<ref.size();++i) l += ref[i]*y[i]; for (size_t i=0;i<x.size();++i) r += x[i]*back[i];
    printf("col2im adjoint pad %u: %g vs %g\n", pad, l, r); fails += std::fabs(l-r) > 1e-9;
  }
  // norm forward/backward: N=2, O=3, H=W=4, pool on/off, slope 0 and 0.01
  for (unsigned pool : {0u, 1u}) for (double slope : {0.0, 0.01}) {
    unsigned N=2,O=3,H=4,W=4,HW=H*W,rows=N*O, HWO = pool?HW/4:HW;
    std::vector<double> z(rows*HW), prm(3*O), da(rows*HWO);
    for (auto& v: z) v = nd(rng); for (auto& v: prm) v = nd(rng); for (auto& v: da) v = nd(rng);
    double eps = 1e-5;
    std::vector<double> out(rows*HW + rows + rows*HWO, -7);
    launch(4, 8, [&]{ norm_act_fwd_f64(z.data(), prm.data(), out.data(), rows, O, H, W, pool, slope, eps); });
    // reference forward, and the loss L = sum(act * da) whose gradient wrt z (+bias) and gamma/beta we check
    auto act_of = [&](const std::vector<double>& zz, const std::vector<double>& pp, std::vector<double>* xh, std::vector<double>* invs) {
      std::vector<double> act(rows*HWO, 0);
      for (unsigned r=0;r<rows;++r) { unsigned ch=r%O; double b=pp[ch], g=pp[O+ch], be=pp[2*O+ch];
        double m=0; for (unsigned p=0;p<HW;++p) m += zz[r*HW+p]+b; m/=HW;
        double v=0; for (unsigned p=0;p<HW;++p) { double d=zz[r*HW+p]+b-m; v+=d*d; } v/=HW; double inv=1/std::sqrt(v+eps);
        if (invs) (*invs)[r]=inv;
        for (unsigned p=0;p<HW;++p) { double xx=(zz[r*HW+p]+b-m)*inv; if (xh) (*xh)[r*HW+p]=xx; double y=xx*g+be; double a = y>0?y:y*slope;
          unsigned q = pool ? (p/W/2)*(W/2)+(p%W)/2 : p; act[r*HWO+q] += pool ? 0.25*a : a; } }
      return act; };
    std::vector<double> xh(rows*HW), invs(rows);
    auto act = act_of(z, prm, &xh, &invs);
    std::vector<double> got_x(out.begin(), out.begin()+rows*HW), got_i(out.begin()+rows*HW, out.begin()+rows*HW+rows), got_a(out.begin()+rows*HW+rows, out.end());
    double d = std::max({maxdiff(got_x, xh), maxdiff(got_i, invs), maxdiff(got_a, act)});
    printf("norm fwd pool %u slope %g: %g\n", pool, slope, d); fails += d > 1e-12;
    {  // the f32 entry point: the same numbers at single precision
      std::vector<float> zf(z.begin(), z.end()), pf(prm.begin(), prm.end()), of(out.size(), -7);
      launch(4, 8, [&]{ norm_act_fwd_f32(zf.data(), pf.data(), of.data(), rows, O, H, W, pool, (float)slope, (float)eps); });
      std::vector<double> od(of.begin(), of.end());
      double df = maxdiff(od, out);
      printf("norm fwd f32 vs f64: %g\n", df); fails += df > 1e-4;
    }
    std::vector<double> bout(rows*HW + 3*rows, -7);
    launch(4, 8, [&]{ norm_act_bwd_f64(da.data(), out.data(), prm.data(), bout.data(), rows, O, H, W, pool, slope); });
    auto loss = [&](const std::vector<double>& zz, const std::vector<double>& pp) { auto a = act_of(zz, pp, nullptr, nullptr); double l=0; for (size_t i=0;i<a.size();++i) l += a[i]*da[i]; return l; };
    double h = 1e-6, worst = 0;
    for (unsigned i=0;i<rows*HW;++i) { auto zp=z, zm=z; zp[i]+=h; zm[i]-=h; double fd=(loss(zp,prm)-loss(zm,prm))/(2*h); worst=std::max(worst, std::fabs(fd-bout[i])); }
    // per-row sums summed over the batch = d L / d (bias, gamma, beta) of the channel
    for (unsigned k=0;k<3;++k) for (unsigned ch=0;ch<O;++ch) {
      unsigned pi = (k==0? ch : k==1? O+ch : 2*O+ch); // bias | gamma | beta
      unsigned si = (k==0? 2 : k==1? 0 : 1); // sums: gamma | beta | bias(dz)
      auto pp=prm, pm=prm; pp[pi]+=h; pm[pi]-=h; double fd=(loss(z,pp)-loss(z,pm))/(2*h);
      double s=0; for (unsigned n=0;n<N;++n) s += bout[rows*HW + si*rows + n*O+ch];
      worst=std::max(worst, std::fabs(fd-s)); }
    printf("norm bwd pool %u slope %g vs finite differences: %g\n", pool, slope, worst); fails += worst > 1e-6;
  }
  printf(fails ? "FAIL %d\n" : "all ok\n", fails);
  return fails != 0;
}
