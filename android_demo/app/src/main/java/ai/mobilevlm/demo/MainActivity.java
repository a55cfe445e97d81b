package ai.mobilevlm.demo;

import ai.mobilevlm.core.BundleException;
import ai.mobilevlm.core.Engine;
import ai.mobilevlm.core.ImagePreprocessor;
import ai.mobilevlm.core.Manifest;
import ai.mobilevlm.core.RgbImage;
import ai.mobilevlm.core.Session;
import ai.mobilevlm.core.StopController;
import ai.mobilevlm.core.Tokenizer;
import android.app.Activity;
import android.content.Intent;
import android.graphics.Color;
import android.graphics.Typeface;
import android.os.Bundle;
import android.util.Log;
import android.view.View;
import android.widget.AdapterView;
import android.widget.ArrayAdapter;
import android.widget.Button;
import android.widget.EditText;
import android.widget.ImageView;
import android.widget.LinearLayout;
import android.widget.ScrollView;
import android.widget.Spinner;
import android.widget.TextView;
import java.io.File;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;

/**
 * Pick a bundle folder, a picture and a question; watch the answer stream and the runner's statistics.
 * Started with the extra {@code benchmark=true} it runs benchmark mode instead (see README).
 */
public final class MainActivity extends Activity {
    static final String EXTRA_BENCHMARK = "benchmark";
    static final String EXTRA_BUNDLE = "bundle";
    static final String EXTRA_ARTIFACT = "artifact";
    static final String EXTRA_REPEATS = "repeats";
    static final String EXTRA_WARMUP = "warmup";
    private static final int PICK_PICTURE = 1;

    private final ExecutorService worker = Executors.newSingleThreadExecutor();
    private EditText bundlePath;
    private Spinner artifactChoice;
    private TextView status;
    private ImageView preview;
    private EditText question;
    private TextView answer;
    private TextView stats;
    private Button askButton;

    private Manifest manifest;
    private Tokenizer tokenizer;
    private Engine engine;
    private Session session;
    private RgbImage picture;
    private final List<Manifest.Artifact> artifacts = new ArrayList<Manifest.Artifact>();

    @Override
    protected void onCreate(Bundle saved) {
        super.onCreate(saved);
        buildViews();
        Intent intent = getIntent();
        String bundle = intent.getStringExtra(EXTRA_BUNDLE);
        bundlePath.setText(bundle != null ? bundle : defaultBundle());
        if (intent.getBooleanExtra(EXTRA_BENCHMARK, false)) {
            startBenchmark(intent);
        }
    }

    /** The first folder under files/bundles/ (where the README's adb push puts a bundle). */
    private String defaultBundle() {
        File bundles = new File(getExternalFilesDir(null), "bundles");
        File[] found = bundles.listFiles();
        if (found != null) {
            for (File f : found) {
                if (new File(f, Manifest.FILE).isFile()) {
                    return f.getPath();
                }
            }
        }
        return new File(bundles, "demo-bundle").getPath();
    }

    private void buildViews() {
        LinearLayout column = new LinearLayout(this);
        column.setOrientation(LinearLayout.VERTICAL);
        int pad = (int) (12 * getResources().getDisplayMetrics().density);
        column.setPadding(pad, pad, pad, pad);
        TextView title = new TextView(this);
        title.setText(R.string.app_name);
        title.setTextSize(22);
        column.addView(title);

        bundlePath = new EditText(this);
        bundlePath.setHint(R.string.bundle_hint);
        bundlePath.setSingleLine(true);
        column.addView(bundlePath);
        Button load = button(R.string.load, new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                loadBundle(bundlePath.getText().toString().trim());
            }
        });
        column.addView(load);
        artifactChoice = new Spinner(this);
        artifactChoice.setOnItemSelectedListener(new AdapterView.OnItemSelectedListener() {
            @Override
            public void onItemSelected(AdapterView<?> parent, View view, int position, long id) {
                if (manifest != null && position < artifacts.size()) {
                    startEngine(artifacts.get(position));
                }
            }

            @Override
            public void onNothingSelected(AdapterView<?> parent) {
            }
        });
        column.addView(artifactChoice);
        status = new TextView(this);
        column.addView(status);

        column.addView(button(R.string.pick_picture, new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                Intent pick = new Intent(Intent.ACTION_GET_CONTENT);
                pick.setType("image/*");
                startActivityForResult(Intent.createChooser(pick, getString(R.string.pick_picture)), PICK_PICTURE);
            }
        }));
        preview = new ImageView(this);
        preview.setAdjustViewBounds(true);
        preview.setMaxHeight((int) (220 * getResources().getDisplayMetrics().density));
        column.addView(preview);
        question = new EditText(this);
        question.setHint(R.string.question_hint);
        column.addView(question);
        LinearLayout buttons = new LinearLayout(this);
        askButton = button(R.string.ask, new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                ask();
            }
        });
        buttons.addView(askButton);
        buttons.addView(button(R.string.stop, new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                if (engine != null) {
                    engine.stop();
                }
            }
        }));
        column.addView(buttons);
        answer = new TextView(this);
        answer.setTextSize(18);
        column.addView(answer);
        stats = new TextView(this);
        stats.setTypeface(Typeface.MONOSPACE);
        stats.setTextSize(12);
        column.addView(stats);
        ScrollView scroll = new ScrollView(this);
        scroll.addView(column);
        setContentView(scroll);
    }

    private Button button(int text, View.OnClickListener listener) {
        Button b = new Button(this);
        b.setText(text);
        b.setOnClickListener(listener);
        return b;
    }

    private void showStatus(final String text, final boolean error) {
        runOnUiThread(new Runnable() {
            @Override
            public void run() {
                status.setText(text);
                status.setTextColor(error ? Color.rgb(0xC6, 0x28, 0x28) : Color.DKGRAY);
            }
        });
    }

    private void loadBundle(final String path) {
        showStatus(getString(R.string.loading), false);
        worker.execute(new Runnable() {
            @Override
            public void run() {
                try {
                    closeEngine();
                    final Manifest m = Manifest.load(new File(path), Manifest.Verify.SIZE);
                    Tokenizer loaded = null;
                    try {
                        loaded = Tokenizer.load(m.file(m.tokenizerFile));
                    } catch (BundleException e) {
                        // The runtime tokenizes for itself; without our tokenizer only the prompt-length check is lost.
                        showStatus(e.getMessage() + " (prompts are not length-checked)", false);
                    }
                    final Tokenizer t = loaded;
                    final List<Manifest.Artifact> found = m.artifacts("executorch");
                    if (found.isEmpty()) {
                        m.firstArtifact("executorch"); // throws, naming what the bundle has
                    }
                    RgbImage first = null;
                    if (!m.parityCases.isEmpty()) {
                        first = Pictures.decode(m.file(m.parityCases.get(0).image));
                    }
                    final RgbImage sample = first;
                    runOnUiThread(new Runnable() {
                        @Override
                        public void run() {
                            manifest = m;
                            tokenizer = t;
                            artifacts.clear();
                            artifacts.addAll(found);
                            List<String> names = new ArrayList<String>();
                            for (Manifest.Artifact a : found) {
                                names.add(a.name + " (" + a.quantization + ")");
                            }
                            artifactChoice.setAdapter(new ArrayAdapter<String>(MainActivity.this, android.R.layout.simple_spinner_dropdown_item, names));
                            if (picture == null && sample != null) {
                                setPicture(sample);
                                question.setText(m.parityCases.get(0).question);
                            }
                        }
                    });
                } catch (BundleException e) {
                    showStatus(e.getMessage(), true);
                }
            }
        });
    }

    private void startEngine(final Manifest.Artifact artifact) {
        showStatus(getString(R.string.loading) + " " + artifact.name, false);
        worker.execute(new Runnable() {
            @Override
            public void run() {
                try {
                    closeEngine();
                    long started = System.nanoTime();
                    Engine e = Engines.create(manifest, artifact);
                    e.load();
                    engine = e;
                    session = new Session(manifest, tokenizer, e);
                    showStatus(artifact.name + " loaded in " + ai.mobilevlm.core.Format.fixed((System.nanoTime() - started) / 1e9, 2) + " s", false);
                } catch (BundleException e) {
                    showStatus(e.getMessage(), true);
                }
            }
        });
    }

    private void closeEngine() {
        if (engine != null) {
            engine.close();
            engine = null;
            session = null;
        }
    }

    private void setPicture(RgbImage image) {
        picture = image;
        preview.setImageBitmap(Pictures.toBitmap(image));
        if (manifest != null) {
            // What the model sees: the manifest's preprocessing, as a tooltip-sized hint in the status line.
            RgbImage seen = ImagePreprocessor.prepare(image, manifest.image.size, manifest.image.aspectMode, manifest.image.padColor);
            showStatus(image.width + "x" + image.height + " → " + seen.width + "x" + seen.height + " (" + manifest.image.aspectMode + ")", false);
        }
    }

    @Override
    protected void onActivityResult(int requestCode, int resultCode, Intent data) {
        if (requestCode != PICK_PICTURE || resultCode != RESULT_OK || data == null || data.getData() == null) {
            return;
        }
        try {
            setPicture(Pictures.decode(Pictures.copyToCache(getContentResolver(), data.getData(), getCacheDir())));
        } catch (BundleException e) {
            showStatus(e.getMessage(), true);
        }
    }

    private void ask() {
        final Session s = session;
        final RgbImage image = picture;
        final String q = question.getText().toString();
        if (s == null) {
            showStatus(getString(R.string.no_engine), true);
            return;
        }
        if (image == null) {
            showStatus(getString(R.string.no_picture), true);
            return;
        }
        answer.setText("");
        stats.setText("");
        askButton.setEnabled(false);
        worker.execute(new Runnable() {
            @Override
            public void run() {
                try {
                    int maxNew = Math.max(1, Math.min(256, s.manifest.prompt.contextLength / 2));
                    final Session.Answer a = s.ask(image, q, maxNew, new Session.Listener() {
                        @Override
                        public void onAnswer(final String visible) {
                            runOnUiThread(new Runnable() {
                                @Override
                                public void run() {
                                    answer.setText(visible);
                                }
                            });
                        }
                    });
                    runOnUiThread(new Runnable() {
                        @Override
                        public void run() {
                            answer.setText(a.text);
                            String why = a.reason == StopController.Reason.MAX_NEW_TOKENS ? " (token limit)" : "";
                            stats.setText((a.stats != null ? a.stats.line() : "no statistics from the runner") + why);
                        }
                    });
                } catch (BundleException e) {
                    showStatus(e.getMessage(), true);
                } finally {
                    runOnUiThread(new Runnable() {
                        @Override
                        public void run() {
                            askButton.setEnabled(true);
                        }
                    });
                }
            }
        });
    }

    private void startBenchmark(Intent intent) {
        final File bundle = new File(bundlePath.getText().toString());
        final String artifact = intent.getStringExtra(EXTRA_ARTIFACT);
        final int repeats = intent.getIntExtra(EXTRA_REPEATS, 3);
        final int warmup = intent.getIntExtra(EXTRA_WARMUP, 1);
        answer.setText(R.string.benchmark_running);
        worker.execute(new Runnable() {
            @Override
            public void run() {
                Benchmark.run(MainActivity.this, bundle, artifact, repeats, warmup, new Benchmark.Progress() {
                    @Override
                    public void say(final String line) {
                        Log.i(Benchmark.TAG, line);
                        runOnUiThread(new Runnable() {
                            @Override
                            public void run() {
                                stats.append(line + "\n");
                            }
                        });
                    }
                });
            }
        });
    }

    @Override
    protected void onDestroy() {
        worker.execute(new Runnable() {
            @Override
            public void run() {
                closeEngine();
            }
        });
        worker.shutdown();
        super.onDestroy();
    }
}
