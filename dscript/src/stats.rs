//! The statistics behind the built-ins, over plain `f64` slices.
//!
//! Every function reports too-short inputs as an error instead of returning NaN, so a
//! policy never compares against a NaN by accident.

pub type StatResult = Result<f64, String>;

fn need(xs: &[f64], n: usize, what: &str) -> Result<(), String> {
    if xs.len() < n {
        Err(format!("{what} needs at least {n} value{}, got {}", if n == 1 { "" } else { "s" }, xs.len()))
    } else {
        Ok(())
    }
}

pub fn sum(xs: &[f64]) -> f64 {
    xs.iter().sum()
}

pub fn mean(xs: &[f64]) -> StatResult {
    need(xs, 1, "mean")?;
    Ok(sum(xs) / xs.len() as f64)
}

/// Sample standard deviation (divides by n − 1).
pub fn stddev(xs: &[f64]) -> StatResult {
    need(xs, 2, "stddev")?;
    let m = mean(xs)?;
    let ss: f64 = xs.iter().map(|x| (x - m) * (x - m)).sum();
    Ok((ss / (xs.len() - 1) as f64).sqrt())
}

pub fn min(xs: &[f64]) -> StatResult {
    need(xs, 1, "min")?;
    Ok(xs.iter().copied().fold(f64::INFINITY, f64::min))
}

pub fn max(xs: &[f64]) -> StatResult {
    need(xs, 1, "max")?;
    Ok(xs.iter().copied().fold(f64::NEG_INFINITY, f64::max))
}

/// The p-th percentile (0..=100), linear interpolation between closest ranks.
pub fn percentile(xs: &[f64], p: f64) -> StatResult {
    need(xs, 1, "percentile")?;
    if !(0.0..=100.0).contains(&p) {
        return Err(format!("percentile must be between 0 and 100, got {p}"));
    }
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let (a, b) = (sorted[lo], sorted[hi.min(sorted.len() - 1)]);
    Ok(a + (b - a) * (rank - lo as f64))
}

/// Exponentially weighted moving average; the first value seeds it.
pub fn ewma(xs: &[f64], alpha: f64) -> StatResult {
    need(xs, 1, "ewma")?;
    check_weight(alpha, "ewma weight")?;
    Ok(xs[1..].iter().fold(xs[0], |s, x| alpha * x + (1.0 - alpha) * s))
}

fn check_weight(w: f64, what: &str) -> Result<(), String> {
    if w > 0.0 && w <= 1.0 {
        Ok(())
    } else {
        Err(format!("{what} must be in (0, 1], got {w}"))
    }
}

/// Least-squares slope of `ys` against `xs`.
pub fn regression_slope(xs: &[f64], ys: &[f64]) -> StatResult {
    need(ys, 2, "slope")?;
    let (mx, my) = (mean(xs)?, mean(ys)?);
    let mut sxy = 0.0;
    let mut sxx = 0.0;
    for (x, y) in xs.iter().zip(ys) {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
    }
    if sxx == 0.0 {
        return Err("slope is undefined: all samples share one time".into());
    }
    Ok(sxy / sxx)
}

/// Least-squares slope against the sample index 0, 1, 2, ...: change per sample.
pub fn slope(ys: &[f64]) -> StatResult {
    need(ys, 2, "slope")?;
    let xs: Vec<f64> = (0..ys.len()).map(|i| i as f64).collect();
    regression_slope(&xs, ys)
}

/// Control limits: (center, lower, upper).
pub type Limits = (f64, f64, f64);

/// Shewhart chart: mean ± k standard deviations.
pub fn shewhart(xs: &[f64], k: f64) -> Result<Limits, String> {
    let c = mean(xs)?;
    let s = stddev(xs)?;
    Ok((c, c - k * s, c + k * s))
}

/// EWMA chart (asymptotic limits): mean ± L·σ·sqrt(λ / (2 − λ)).
pub fn ewma_limits(xs: &[f64], lambda: f64, l: f64) -> Result<Limits, String> {
    check_weight(lambda, "ewma_limits weight")?;
    let c = mean(xs)?;
    let s = stddev(xs)?;
    let w = l * s * (lambda / (2.0 - lambda)).sqrt();
    Ok((c, c - w, c + w))
}

fn paired(xs: &[f64], ys: &[f64], what: &str) -> Result<(), String> {
    if xs.len() != ys.len() {
        return Err(format!("{what} needs two series of equal length, got {} and {}", xs.len(), ys.len()));
    }
    need(xs, 2, what)
}

/// Pearson correlation; 0 when either series is constant (no linear relation can show).
pub fn pearson(xs: &[f64], ys: &[f64]) -> StatResult {
    paired(xs, ys, "pearson")?;
    let (mx, my) = (mean(xs)?, mean(ys)?);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (x, y) in xs.iter().zip(ys) {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
        syy += (y - my) * (y - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        return Ok(0.0);
    }
    Ok(sxy / (sxx * syy).sqrt())
}

/// Spearman rank correlation: Pearson over ranks, ties sharing their average rank.
pub fn spearman(xs: &[f64], ys: &[f64]) -> StatResult {
    paired(xs, ys, "spearman")?;
    pearson(&ranks(xs), &ranks(ys))
}

fn ranks(xs: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    idx.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    let mut out = vec![0.0; xs.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && xs[idx[j + 1]] == xs[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            out[k] = avg;
        }
        i = j + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn basics() {
        let xs = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        assert!(close(mean(&xs).unwrap(), 5.0));
        assert!(close(stddev(&xs).unwrap(), (32.0f64 / 7.0).sqrt()));
        assert!(close(percentile(&xs, 50.0).unwrap(), 4.5));
        assert!(close(percentile(&xs, 100.0).unwrap(), 9.0));
        assert!(close(slope(&[1.0, 3.0, 5.0]).unwrap(), 2.0));
        assert!(close(ewma(&[1.0, 3.0], 0.5).unwrap(), 2.0));
        assert!(close(pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 7.0]).unwrap(), 0.9933992677987828));
        assert!(close(spearman(&[1.0, 2.0, 3.0], &[2.0, 4.0, 70.0]).unwrap(), 1.0));
        assert!(mean(&[]).is_err());
        assert!(pearson(&[1.0], &[1.0, 2.0]).is_err());
        let (c, lo, hi) = shewhart(&[1.0, 2.0, 3.0], 3.0).unwrap();
        assert!(close(c, 2.0) && close(lo, -1.0) && close(hi, 5.0));
    }
}
