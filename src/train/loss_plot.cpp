// The end-of-training loss curve as a self-contained SVG (no dependencies):
// train loss as a line and eval loss as a line with markers, against tokens
// seen, on "nice" axis ticks (1, 2, 2.5, 5 x 10^k steps).
#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "unswag/train/trainer.h"

namespace unswag::train {

namespace {

// A tick step of about range / target ticks, rounded to 1, 2, 2.5 or 5 x 10^k.
double nice_step(double range, int target) {
  const double raw = range / std::max(1, target);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  for (double f : {1.0, 2.0, 2.5, 5.0, 10.0}) {
    if (f * mag >= raw) return f * mag;
  }
  return 10 * mag;
}

std::string tick_label(double v) {
  const double a = std::abs(v);
  if (a >= 1e9) return fmt::format("{:g}G", v / 1e9);
  if (a >= 1e6) return fmt::format("{:g}M", v / 1e6);
  if (a >= 1e3) return fmt::format("{:g}k", v / 1e3);
  return fmt::format("{:g}", v);
}

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

}  // namespace

std::string loss_curve_svg(const std::vector<StepMetrics>& history, const std::string& title) {
  const double width = 760, height = 460, left = 70, right = 20, top = 40, bottom = 60;
  const double plot_w = width - left - right, plot_h = height - top - bottom;
  double x_max = 0, y_min = std::numeric_limits<double>::infinity(), y_max = -y_min;
  for (const auto& m : history) {
    x_max = std::max(x_max, double(m.tokens));
    for (double y : {m.loss, m.eval_loss.value_or(m.loss)}) {
      if (!std::isfinite(y)) continue;
      y_min = std::min(y_min, y);
      y_max = std::max(y_max, y);
    }
  }
  if (!std::isfinite(y_min)) y_min = 0, y_max = 1;
  if (y_max - y_min < 1e-9) y_min -= 0.5, y_max += 0.5;
  if (x_max <= 0) x_max = 1;
  const double y_step = nice_step(y_max - y_min, 6), x_step = nice_step(x_max, 6);
  const double y_lo = std::floor(y_min / y_step) * y_step, y_hi = std::ceil(y_max / y_step) * y_step;
  const double x_hi = std::ceil(x_max / x_step) * x_step;
  auto px = [&](double x) { return left + plot_w * x / x_hi; };
  auto py = [&](double y) { return top + plot_h * (1.0 - (y - y_lo) / (y_hi - y_lo)); };

  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n"
      "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{2}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{3}</text>\n",
      width, height, left + plot_w / 2, escape(title));
  // Grid and tick labels.
  for (double y = y_lo; y <= y_hi + y_step / 2; y += y_step) {
    svg += fmt::format("<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#ddd\"/>\n", left, py(y),
                       left + plot_w, py(y));
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n", left - 6, py(y) + 4,
                       tick_label(std::abs(y) < y_step * 1e-9 ? 0.0 : y));
  }
  for (double x = 0; x <= x_hi + x_step / 2; x += x_step) {
    svg += fmt::format("<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#ddd\"/>\n", px(x), top,
                       px(x), top + plot_h);
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{}</text>\n", px(x), top + plot_h + 18,
                       tick_label(x));
  }
  svg += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333\"/>\n", left, top,
                     plot_w, plot_h);
  svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">tokens seen</text>\n", left + plot_w / 2,
                     height - 18);
  svg += fmt::format("<text transform=\"translate(18 {:.1f}) rotate(-90)\" text-anchor=\"middle\">loss (nats/token)"
                     "</text>\n", top + plot_h / 2);
  // The curves.
  std::string train_points, eval_points, eval_marks;
  for (const auto& m : history) {
    if (std::isfinite(m.loss)) train_points += fmt::format("{:.1f},{:.1f} ", px(double(m.tokens)), py(m.loss));
    if (m.eval_loss && std::isfinite(*m.eval_loss)) {
      eval_points += fmt::format("{:.1f},{:.1f} ", px(double(m.tokens)), py(*m.eval_loss));
      eval_marks += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"#d62728\"/>\n",
                                px(double(m.tokens)), py(*m.eval_loss));
    }
  }
  svg += "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"" + train_points + "\"/>\n";
  if (!eval_points.empty()) {
    svg += "<polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"1.5\" points=\"" + eval_points + "\"/>\n";
    svg += eval_marks;
  }
  // Legend.
  const double lx = left + plot_w - 130, ly = top + 16;
  svg += fmt::format("<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#1f77b4\" stroke-width=\"2\"/>"
                     "<text x=\"{}\" y=\"{}\">train loss</text>\n", lx, ly, lx + 24, ly, lx + 30, ly + 4);
  if (!eval_points.empty()) {
    svg += fmt::format("<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#d62728\" stroke-width=\"2\"/>"
                       "<text x=\"{}\" y=\"{}\">eval loss</text>\n", lx, ly + 18, lx + 24, ly + 18, lx + 30, ly + 22);
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace unswag::train
