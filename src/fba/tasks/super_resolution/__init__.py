"""Super-resolution: EDSR on DIV2K, benchmark folders and built-in photos; PSNR/SSIM on Y."""
